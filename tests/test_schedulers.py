"""FusedLCMScheduler / FusedDDIMScheduler: drop-ins for diffusers' schedulers (same results for the
same generator, same config and API), with a step() that never synchronises with the device."""

import itertools

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from helpers import DEVICES, LIMITS, SD_SCHEDULE, assert_close, assert_tight, fake_model

from rglcd_fast.reference import solver as ref
from rglcd_fast.schedulers import FusedDDIMScheduler, FusedLCMScheduler

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def run_pair(ours, theirs, device="cpu", dtype=torch.float32, shape=(2, 4, 8, 8), step_kwargs=None, seed=0):
    """The same denoising loop through both schedulers, noise from same-seeded generators. float32:
    each on its own trajectory, compared tightly at every step; float16/bfloat16: our step on diffusers'
    inputs, judged by the dtype-error rule against the float64 reference of the same step."""
    step_kwargs = step_kwargs or {}
    g_ours = torch.Generator(device).manual_seed(seed)
    g_theirs = torch.Generator(device).manual_seed(seed)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    x_ours = x_theirs = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)
    for i, t in enumerate(theirs.timesteps):
        m = fake_model(x_theirs, t.to(device), base)
        out_theirs = theirs.step(m, t, x_theirs, generator=g_theirs, return_dict=False, **step_kwargs)
        if dtype == torch.float32:
            out_ours = ours.step(
                fake_model(x_ours, t.to(device), base),
                ours.timesteps[i],
                x_ours,
                generator=g_ours,
                return_dict=False,
                **step_kwargs,
            )
            for k in range(len(out_theirs)):  # diffusers < 0.31's DDIM gives (prev_sample,) alone
                assert_tight(out_ours[k], out_theirs[k], f"step {i} output {k}")
        else:
            state = g_ours.get_state()
            out_ours = ours.step(m, ours.timesteps[i], x_theirs, generator=g_ours, return_dict=False, **step_kwargs)
            g_exact = torch.Generator(device).manual_seed(0)
            g_exact.set_state(state)
            exact = _exact_step(ours, i, m, x_theirs, g_exact, step_kwargs)
            for k in range(len(out_theirs)):  # diffusers < 0.31's DDIM gives (prev_sample,) alone
                assert_close(out_ours[k], out_theirs[k], exact[k], f"step {i} output {k}")
        x_ours, x_theirs = out_ours[0], out_theirs[0]
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def _exact_step(scheduler, i, m, x, generator, step_kwargs):
    """The float64 reference of our step i on the same inputs and the same noise draws."""
    from diffusers.utils.torch_utils import randn_tensor

    config, t = scheduler.config, scheduler.timesteps[i]
    kw = dict(
        prediction_type=config.prediction_type,
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
        thresholding=config.thresholding,
        dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
        sample_max_value=config.sample_max_value,
    )
    ac, final = scheduler.alphas_cumprod.double().to(x.device), float(scheduler.final_alpha_cumprod)
    if isinstance(scheduler, LCMScheduler):
        last = i == len(scheduler.timesteps) - 1
        noise = None if last else randn_tensor(m.shape, generator=generator, device=m.device, dtype=x.dtype).double()
        prev = t if last else scheduler.timesteps[i + 1]
        return ref.lcm_step(
            m.double(), x.double(), t, prev, ac, noise, final, timestep_scaling=config.timestep_scaling, **kw
        )
    eta = step_kwargs.get("eta", 0.0)
    noise = randn_tensor(m.shape, generator=generator, device=m.device, dtype=m.dtype).double() if eta > 0 else None
    prev = t - config.num_train_timesteps // scheduler.num_inference_steps
    return ref.ddim_step(
        m.double(),
        x.double(),
        t,
        prev,
        ac,
        noise,
        final,
        eta,
        use_clipped_model_output=step_kwargs.get("use_clipped_model_output", False),
        **kw,
    )


def pair(fused_cls, diffusers_cls, config, device="cpu", **set_timesteps):
    ours, theirs = fused_cls(**config), diffusers_cls(**config)
    ours.set_timesteps(device=device, **set_timesteps)
    theirs.set_timesteps(device=device, **set_timesteps)
    return ours, theirs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "prediction_type,limit,set_alpha_to_one", list(itertools.product(PREDICTION_TYPES, LIMITS, [True, False]))
)
def test_lcm_matches_diffusers(prediction_type, limit, set_alpha_to_one, device):
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, **LIMITS[limit])
    for steps in (1, 2, 4, 8):
        run_pair(*pair(FusedLCMScheduler, LCMScheduler, config, device, num_inference_steps=steps), device)


@pytest.mark.parametrize("device", DEVICES)
def test_lcm_custom_timesteps_and_original_steps(device):
    config = dict(SD_SCHEDULE)
    run_pair(*pair(FusedLCMScheduler, LCMScheduler, config, device, timesteps=[999, 759, 499, 259]), device)
    run_pair(
        *pair(FusedLCMScheduler, LCMScheduler, config, device, num_inference_steps=3, original_inference_steps=30),
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_lcm_generator_forms(device):
    """The noise of every form of generator diffusers takes: the default one (None) and one on the
    sample's device (drawn by the op), one per sample (a list) or one on another device (randn_tensor)."""
    forms = {
        "default": lambda: None,
        "one per sample": lambda: [torch.Generator(device).manual_seed(s) for s in (1, 2)],
    }
    if device == "cuda":
        forms["on the CPU"] = lambda: torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    for name, make_generator in forms.items():
        loops = []
        for scheduler in pair(
            FusedLCMScheduler, LCMScheduler, dict(SD_SCHEDULE, thresholding=True), device, num_inference_steps=4
        ):
            torch.manual_seed(0)
            generator, x, outputs = make_generator(), base.clone(), []
            for t in scheduler.timesteps:
                x, denoised = scheduler.step(fake_model(x, t, base), t, x, generator=generator, return_dict=False)
                outputs += [x, denoised]
            loops.append(outputs)
        for k, (ours, theirs) in enumerate(zip(*loops)):
            assert_tight(ours, theirs, f"{name}: step {k // 2} output {k % 2}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "prediction_type,limit,eta,use_clipped",
    list(itertools.product(PREDICTION_TYPES, LIMITS, [0.0, 0.5], [False, True])),
)
def test_ddim_matches_diffusers(prediction_type, limit, eta, use_clipped, device):
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, set_alpha_to_one=not use_clipped, **LIMITS[limit])
    for steps in (1, 5, 50):
        run_pair(
            *pair(FusedDDIMScheduler, DDIMScheduler, config, device, num_inference_steps=steps),
            device,
            step_kwargs=dict(eta=eta, use_clipped_model_output=use_clipped),
        )


# Settings diffusers accepts at the edges of their range (it checks none of them); each must run and give
# diffusers' result. torch.clamp's rule where bounds cross: the maximum wins (sample_max_value < 1 becomes
# the threshold; a clip range <= 0 maps everything to it); torch.quantile takes q in [0, 1].
EDGE_CONFIGS = {
    "sample_max_value below 1": dict(thresholding=True, sample_max_value=0.5),
    "sample_max_value negative": dict(thresholding=True, sample_max_value=-1.0),
    "thresholding ratio 0": dict(thresholding=True, dynamic_thresholding_ratio=0.0, sample_max_value=3.0),
    "thresholding ratio 1": dict(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=3.0),
    "clip range 0": dict(clip_sample=True, clip_sample_range=0.0),
    "clip range negative": dict(clip_sample=True, clip_sample_range=-0.5),
    "clip range below 1": dict(clip_sample=True, clip_sample_range=0.25),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edge", EDGE_CONFIGS)
def test_edge_settings_diffusers_accepts_give_its_result(edge, device):
    config = dict(SD_SCHEDULE, **EDGE_CONFIGS[edge])
    run_pair(*pair(FusedLCMScheduler, LCMScheduler, config, device, num_inference_steps=4), device)
    run_pair(
        *pair(FusedDDIMScheduler, DDIMScheduler, config, device, num_inference_steps=5),
        device,
        step_kwargs=dict(eta=0.5),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_negative_eta_is_diffusers_ddim(device):
    """diffusers takes any eta: σ = η·sqrt(var) enters the direction squared, the noise only when η > 0."""
    run_pair(
        *pair(FusedDDIMScheduler, DDIMScheduler, dict(SD_SCHEDULE), device, num_inference_steps=10),
        device,
        step_kwargs=dict(eta=-0.5),
    )


def test_settings_outside_what_diffusers_can_run_are_named():
    for ratio in (-0.1, 1.5):  # torch.quantile refuses q outside [0, 1], so diffusers' step raises too
        with pytest.raises(ValueError, match="dynamic_thresholding_ratio: expected a value in \\[0, 1\\]"):
            FusedLCMScheduler(**SD_SCHEDULE, thresholding=True, dynamic_thresholding_ratio=ratio).set_timesteps(4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    config = dict(SD_SCHEDULE, set_alpha_to_one=False, clip_sample=True)
    run_pair(*pair(FusedLCMScheduler, LCMScheduler, config, num_inference_steps=4), dtype=dtype)
    run_pair(
        *pair(FusedDDIMScheduler, DDIMScheduler, config, num_inference_steps=10), dtype=dtype, step_kwargs=dict(eta=0.5)
    )


def test_ddim_variance_noise_and_generator_exclusive():
    scheduler = FusedDDIMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(10)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="variance_noise"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    batch = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"variance_noise: shape \(3, 4, 4, 4\) does not broadcast"):
        scheduler.step(batch, scheduler.timesteps[0], batch, eta=0.5, variance_noise=torch.randn(3, 4, 4, 4))


def test_lcm_step_bad_inputs_are_named():
    scheduler = FusedLCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(4)
    x = torch.randn(2, 4, 4, 4)
    scheduler._step_index = 0
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(x, scheduler.timesteps[:3], x)  # three values for two samples
    scheduler._step_index = 0
    with pytest.raises(TypeError, match="timestep"):
        scheduler.step(x, torch.tensor(999.0), x)
    scheduler._step_index = 0
    with pytest.raises(ValueError, match="sample"):
        scheduler.step(x, scheduler.timesteps[0], x[:1])
    with pytest.raises(ValueError, match="prediction_type"):
        FusedLCMScheduler(**SD_SCHEDULE, prediction_type="x0").set_timesteps(4)
    # the first step finds its place in the schedule: diffusers raises an IndexError or a conversion error here
    for timestep, line in [(123, "timestep: 123 is not in the schedule"), (torch.tensor([999, 759]), "one timestep")]:
        scheduler.restart()
        with pytest.raises(ValueError, match=line):
            scheduler.step(x, timestep, x)
    # a configuration refused by set_timesteps is refused again by step(), not half set up
    misconfigured = FusedLCMScheduler(**SD_SCHEDULE)
    misconfigured.register_to_config(prediction_type="eps")
    for call in (lambda: misconfigured.set_timesteps(4), lambda: misconfigured.step(x, misconfigured.timesteps[0], x)):
        with pytest.raises(ValueError, match="prediction_type: expected one of"):
            call()


def test_config_round_trip_and_compatibles(tmp_path):
    lcm = LCMScheduler(**SD_SCHEDULE, prediction_type="v_prediction", timestep_scaling=5.0)
    fused = FusedLCMScheduler.from_config(lcm.config)
    assert fused.config.prediction_type == "v_prediction" and fused.config.timestep_scaling == 5.0
    fused.save_pretrained(tmp_path)
    assert FusedLCMScheduler.from_pretrained(tmp_path).config.timestep_scaling == 5.0
    assert LCMScheduler.from_config(fused.config).config.prediction_type == "v_prediction"
    ddim = FusedDDIMScheduler.from_config(DDIMScheduler(**SD_SCHEDULE).config)
    assert set(ddim.compatibles) >= set(DDIMScheduler(**SD_SCHEDULE).compatibles) | {DDIMScheduler}
    assert LCMScheduler in fused.compatibles
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(
        ddim.add_noise(x, x, torch.tensor([10, 500])),
        DDIMScheduler(**SD_SCHEDULE).add_noise(x, x, torch.tensor([10, 500])),
    )
    assert ddim.scale_model_input(x, 10) is x


def test_step_index_from_any_timestep_form():
    """The first step's index comes from a number, a CPU tensor or an element of scheduler.timesteps
    (as pipelines pass it) without reading the device; set_begin_index wins, as in diffusers."""
    for first in (lambda s: int(s.timesteps[1]), lambda s: s.timesteps[1], lambda s: s.timesteps[1].clone()):
        ours, theirs = pair(FusedLCMScheduler, LCMScheduler, SD_SCHEDULE, num_inference_steps=4)
        x = torch.randn(1, 4, 4, 4)
        ours.step(x, first(ours), x, generator=torch.Generator().manual_seed(0))
        theirs.step(x, first(theirs), x, generator=torch.Generator().manual_seed(0))
        assert ours.step_index == theirs.step_index == 2
    ours.set_timesteps(4)
    ours.set_begin_index(1)
    ours.step(x, ours.timesteps[3], x)
    assert ours.step_index == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sync check needs a CUDA device")
def test_step_does_not_synchronise():
    for cls, kwargs in [(FusedLCMScheduler, {}), (FusedDDIMScheduler, dict(eta=0.3))]:
        scheduler = cls(**SD_SCHEDULE)
        scheduler.set_timesteps(4, device="cuda")
        x = torch.randn(2, 4, 8, 8, device="cuda")
        generator = torch.Generator("cuda").manual_seed(0)
        scheduler.step(x, scheduler.timesteps[0], x, generator=generator, **kwargs)  # copies the schedule once
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in scheduler.timesteps[1:]:
                x = scheduler.step(x, t, x, generator=generator, **kwargs).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")


def tiny_lcm_pipeline(scheduler_cls):
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
        time_cond_proj_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = scheduler_cls(**SD_SCHEDULE)
    return LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_latent_consistency_pipeline_accepts_the_fused_scheduler():
    torch.manual_seed(0)
    pipe = tiny_lcm_pipeline(LCMScheduler)
    prompt_embeds = torch.randn(1, 5, 8)
    kw = dict(
        prompt_embeds=prompt_embeds, num_inference_steps=4, guidance_scale=8.0, height=16, width=16, output_type="pt"
    )
    expected = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config)
    actual = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert isinstance(pipe.scheduler, FusedLCMScheduler)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_the_pipeline_takes_custom_timesteps_autocast_and_a_save_round_trip(tmp_path):
    """What pipelines do around step(): diffusers' retrieve_timesteps passes `timesteps` only to a set_timesteps
    whose signature names it; a float32 pipeline under bf16 autocast hands step() a bf16 UNet output and float32
    latents; a pipeline saved with the fused scheduler names this module in model_index.json and loads it back."""
    from tiny_pipeline import save_tiny_pipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(save_tiny_pipeline(str(tmp_path / "lcm")))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a digit one", guidance_scale=8.0, height=16, width=16)

    def images(output_type="pt", **more):
        return pipe(generator=torch.Generator().manual_seed(3), output_type=output_type, **kw, **more).images

    runs = [dict(timesteps=[999, 759, 499, 259]), dict(num_inference_steps=2)]
    expected = [images(**run) for run in runs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_autocast = images(num_inference_steps=1, output_type="latent")
    pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config)
    for run, theirs in zip(runs, expected):
        torch.testing.assert_close(images(**run), theirs, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = images(num_inference_steps=1, output_type="latent")
    # diffusers' step rounds sqrt(1 - ᾱ)·ε to bf16 there (a 0-dim float32 factor keeps the bf16 dtype); ours
    # computes in float32 (test_step_takes_what_diffusers_step_takes judges both against float64)
    assert latents.dtype == torch.float32
    assert (latents - expected_autocast).abs().max() <= 2 * 2**-8 * expected_autocast.abs().max()
    pipe.save_pretrained(tmp_path / "saved")
    assert isinstance(LatentConsistencyModelPipeline.from_pretrained(tmp_path / "saved").scheduler, FusedLCMScheduler)


@pytest.mark.parametrize(
    "fused_cls,diffusers_cls", [(FusedLCMScheduler, LCMScheduler), (FusedDDIMScheduler, DDIMScheduler)]
)
def test_step_takes_what_diffusers_step_takes(fused_cls, diffusers_cls):
    """Mixed dtypes (computed in the promoted dtype; diffusers rounds some products to the lower one, so both are
    judged against diffusers' step in float64), a DDIM variance_noise of another dtype or to broadcast, settings
    the configuration does not use, a step autograd sees through (diffusers' own step, the same gradient), and
    self.timesteps or the configuration replaced after set_timesteps (an img2img loop's slice)."""
    unused = dict(dynamic_thresholding_ratio=1.5, sample_max_value=None, clip_sample=False, clip_sample_range=None)
    ours, theirs = pair(fused_cls, diffusers_cls, dict(SD_SCHEDULE, **unused), num_inference_steps=4)
    output = 1 if fused_cls is FusedLCMScheduler else 0  # LCM's denoised, DDIM's prev_sample: no noise drawn
    base = torch.randn(2, 4, 4, 4)

    def step(scheduler, m, x, i=0, **kw):
        scheduler._step_index = scheduler._begin_index = None
        kw = {"generator": torch.Generator().manual_seed(0), **kw}
        return scheduler.step(m, scheduler.timesteps[i], x, **kw)

    def judged(m, x, name, **kw):
        exact = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
        a, b = step(ours, m, x, **kw)[output], step(theirs, m, x, **kw)[output]
        assert a.dtype == b.dtype, name
        assert_close(a, b, step(theirs, m.double(), x.double(), **exact)[output], name)

    for m_dtype, x_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)]:
        judged(base.to(m_dtype), 2 * base.to(x_dtype), f"{m_dtype} output on a {x_dtype} sample")
    if fused_cls is FusedDDIMScheduler:
        for noise in (torch.randn(2, 4, 4, 4), torch.randn(1, 4, 4, 4)):  # float32 noise on float16 latents
            kw = dict(eta=0.5, generator=None, variance_noise=noise)
            judged(base.half(), 2 * base.half(), f"variance_noise {tuple(noise.shape)}", **kw)

    extra = dict(eta=0.5) if fused_cls is FusedDDIMScheduler else {}
    grads = []
    for scheduler in (ours, theirs):
        m = base.clone().requires_grad_()
        (step(scheduler, m, 2 * base, **extra)[0] * base).sum().backward()
        grads.append(m.grad)
    assert_tight(*grads, "gradient through step")

    for scheduler in (ours, theirs):
        scheduler.timesteps = scheduler.timesteps[1:]
        scheduler.register_to_config(prediction_type="v_prediction")
    assert_tight(step(ours, base, 2 * base, i=1)[0], step(theirs, base, 2 * base, i=1)[0], "replaced timesteps, config")
