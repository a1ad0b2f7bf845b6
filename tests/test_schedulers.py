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
