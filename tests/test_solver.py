"""Solver family: the guided DDIM solver step of LCD training, and the LCM / DDIM sampling steps as
drop-ins for diffusers' LCMScheduler.step and DDIMScheduler.step."""

import itertools

import lcd_script
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from helpers import (
    CUDA_GRAPHS,
    DEVICES,
    LAYOUTS,
    LIMITS,
    SD_SCHEDULE,
    assert_close,
    assert_tight,
    check_against_reference,
    device_dtype_params,
    fake_model,
    in_layout,
    randn,
    sd_alphas_cumprod,
)

import rglcd_fast
from rglcd_fast import ops
from rglcd_fast.reference import solver as ref

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
SHAPE = (3, 4, 9, 7)  # odd sizes


def make_inputs(device, dtype, shape=SHAPE, seed=0):
    """(cond, uncond, sample, noise, timesteps, prev_timesteps, guidance, alphas_cumprod); the first sample
    at t = 999, the last one's prev_timestep negative (the final step)."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond, sample, noise = (randn(*shape, dtype=dtype, device=device, generator=g) for _ in range(4))
    t = torch.randint(20, 1000, (shape[0],), generator=g)
    if shape[0] > 1:
        t[0], t[-1] = 999, 19
    prev = t - 20
    w = torch.empty(shape[0]).uniform_(5, 15, generator=g)
    return cond, uncond, sample, noise, t.to(device), prev.to(device), w.to(device), sd_alphas_cumprod(device)


def lcm_args(m, x, t, prev, ac, noise=None, final=1.0, prediction_type="epsilon", limit="none", scaling=10.0):
    kw = {
        **dict(
            clip_sample=False,
            clip_sample_range=1.0,
            thresholding=False,
            dynamic_thresholding_ratio=0.995,
            sample_max_value=1.0,
        ),
        **LIMITS[limit],
    }
    return (
        m,
        x,
        t,
        prev,
        ac,
        noise,
        final,
        prediction_type,
        scaling,
        kw["clip_sample"],
        kw["clip_sample_range"],
        kw["thresholding"],
        kw["dynamic_thresholding_ratio"],
        kw["sample_max_value"],
    )


def ddim_args(
    m, x, t, prev, ac, noise=None, final=1.0, eta=0.0, prediction_type="epsilon", limit="none", use_clipped=False
):
    lcm = lcm_args(m, x, t, prev, ac, noise, final, prediction_type, limit)
    return lcm[:7] + (eta, prediction_type) + lcm[9:] + (use_clipped,)


def test_ops_are_registered():
    for name in ["guided_ddim_step", "guided_ddim_step_backward", "lcm_step", "ddim_step"]:
        assert hasattr(torch.ops.rglcd_fast, name)


# ---- forward (and backward) vs the references ------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_guided_matches_reference(prediction_type, device, dtype):
    c, u, x, _, t, prev, w, ac = make_inputs(device, dtype)
    check_against_reference(
        ops.guided_ddim_step,
        ref.guided_ddim_step,
        (c, u, x, t, prev.clamp(min=0), w, ac, prediction_type),
        grad_argnums=(0, 1, 2),
    )


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("limit", list(LIMITS))
def test_lcm_matches_reference(limit, prediction_type, device, dtype):
    _, m, x, z, t, prev, _, ac = make_inputs(device, dtype)
    m = 3 * m  # x0 beyond the clip range and the threshold
    for noise, final in [(z, 1.0), (None, 1.0), (z, ac[0].item())]:
        check_against_reference(
            ops.lcm_step, ref.lcm_step, lcm_args(m, x, t, prev, ac, noise, final, prediction_type, limit)
        )


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("limit", list(LIMITS))
def test_ddim_matches_reference(limit, prediction_type, device, dtype):
    _, m, x, z, t, prev, _, ac = make_inputs(device, dtype)
    m = 3 * m
    for noise, final, eta, use_clipped in [
        (None, 1.0, 0.0, False),
        (z, ac[0].item(), 0.5, False),
        (z, 1.0, 1.0, True),
        (z, 1.0, 0.0, True),
    ]:
        check_against_reference(
            ops.ddim_step,
            ref.ddim_step,
            ddim_args(m, x, t, prev, ac, noise, final, eta, prediction_type, limit, use_clipped),
        )


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, device):
    c, u, x, z, t, prev, w, ac = make_inputs(device, torch.float32)
    cl, ul, xl = (in_layout(v, layout) for v in (c, u, x))
    expected_strides = torch.empty_like(xl).stride()
    outs = check_against_reference(
        ops.guided_ddim_step,
        ref.guided_ddim_step,
        (cl, u, xl, t, prev.clamp(min=0), w, ac, "v_prediction"),
        grad_argnums=(0, 1, 2),
    )
    assert all(o.stride() == expected_strides for o in outs)
    outs = check_against_reference(ops.lcm_step, ref.lcm_step, lcm_args(ul, xl, t, prev, ac, z, limit="threshold"))
    assert all(o.stride() == expected_strides for o in outs)
    outs = check_against_reference(
        ops.ddim_step,
        ref.ddim_step,
        ddim_args(cl, xl, t, prev, ac, in_layout(z, layout), eta=0.5, limit="threshold", use_clipped=True),
    )
    assert all(o.stride() == expected_strides for o in outs)


@pytest.mark.parametrize("shape", [(), (1,)])
def test_broadcast_per_sample_arguments(shape):
    c, u, x, z, _, _, _, ac = make_inputs("cpu", torch.float32)
    t, prev, w = torch.tensor(259).reshape(shape), torch.tensor(239).reshape(shape), torch.tensor(7.5).reshape(shape)
    full = [v.reshape(1).expand(x.shape[0]) for v in (t, prev, w)]
    torch.testing.assert_close(
        ops.guided_ddim_step(c, u, x, t, prev, w, ac), ops.guided_ddim_step(c, u, x, *full, ac), rtol=0, atol=0
    )
    for scale in (7.5, w.double(), w.half()):  # any float type; the kernel reads it as acc_t
        torch.testing.assert_close(
            ops.guided_ddim_step(c, u, x, t, prev, scale, ac), ops.guided_ddim_step(c, u, x, *full, ac), rtol=0, atol=0
        )
    torch.testing.assert_close(
        ops.lcm_step(u, x, t, prev, ac, z, thresholding=True),
        ops.lcm_step(u, x, full[0], full[1], ac, z, thresholding=True),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        ops.ddim_step(u, x, t, prev, ac, z, eta=0.3),
        ops.ddim_step(u, x, full[0], full[1], ac, z, eta=0.3),
        rtol=0,
        atol=0,
    )
    # a per-sample guidance scale broadcast against one timestep, and the reverse
    check_against_reference(ops.guided_ddim_step, ref.guided_ddim_step, (c, u, x, t, full[1], full[2] + 1, ac))
    check_against_reference(ops.guided_ddim_step, ref.guided_ddim_step, (c, u, x, full[0], prev, w, ac))


def test_empty_batch():
    c, u, x, z, t, prev, w, ac = make_inputs("cpu", torch.float32, shape=(0, 4, 5, 5))
    c.requires_grad_()
    x_prev, pred_x0 = ops.guided_ddim_step(c, u, x, t, prev, w, ac)
    assert x_prev.shape == pred_x0.shape == x.shape
    (grad,) = torch.autograd.grad((x_prev.sum() + pred_x0.sum()), c)
    assert grad.shape == c.shape
    for out in [
        *ops.lcm_step(u, x, t, prev, ac, z, thresholding=True),
        *ops.ddim_step(u, x, t, prev, ac, z, eta=0.5, thresholding=True),
    ]:
        assert out.shape == x.shape


def test_other_ranks():
    """Batch-first tensors of any rank: [B, N] tokens, [B, C, F, H, W] video latents."""
    for shape in [(5, 33), (2, 4, 3, 5, 6)]:
        c, u, x, z, t, prev, w, ac = make_inputs("cpu", torch.float32, shape=shape)
        check_against_reference(
            ops.guided_ddim_step,
            ref.guided_ddim_step,
            (c, u, x, t, prev.clamp(min=0), w, ac, "v_prediction"),
            grad_argnums=(0, 1, 2),
        )
        check_against_reference(ops.lcm_step, ref.lcm_step, lcm_args(3 * u, x, t, prev, ac, z, limit="threshold"))
        check_against_reference(
            ops.ddim_step,
            ref.ddim_step,
            ddim_args(3 * u, x, t, prev, ac, z, eta=0.5, limit="threshold", use_clipped=True),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_quantile_matches_torch(device):
    """Per-sample s = clamp(quantile(|x0|, ratio), 1, max): sizes where ratio·(n − 1) falls on, just off and
    between elements, ties, and a sample entirely below 1 (CUDA: the quantile computed on the device)."""
    ac = sd_alphas_cumprod(device)
    g = torch.Generator().manual_seed(3)
    for n, ratio in [(1, 0.995), (2, 0.5), (7, 0.5), (201, 0.995), (4096, 0.995), (1000, 1.0), (33, 0.01)]:
        m = torch.randn(4, n, generator=g) * 4
        m[1] = m[1].round()  # ties
        m[2] *= 0.1  # s clamps to 1
        m = m.to(device)
        x, t, prev = (torch.zeros_like(m), torch.full((4,), 500, device=device), torch.full((4,), 480, device=device))
        args = lcm_args(m, x, t, prev, ac, None, 1.0, "sample", "threshold")
        args = args[:12] + (ratio, 3.0)
        ours = ops.lcm_step(*args)[1]
        _, c_out = ops.boundary_scalings(t)
        s = torch.quantile(m.abs(), ratio, dim=1).clamp(1, 3.0)[:, None]
        torch.testing.assert_close(ours, c_out[:, None] * (m.clamp(-s, s) / s), rtol=1e-6, atol=1e-6)


# ---- the references (and the ops) are drop-ins for diffusers ------------------------------------


def _step_config(scheduler):
    """Our keyword arguments from the scheduler's config (its defaults included: DDIM clips by default)."""
    keys = (
        "prediction_type",
        "clip_sample",
        "clip_sample_range",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
    ) + (("timestep_scaling",) if isinstance(scheduler, LCMScheduler) else ())
    return {k: scheduler.config[k] for k in keys}


def _schedule_for(scheduler, dtype):
    return scheduler.alphas_cumprod.to(torch.float64 if dtype == torch.float64 else torch.float32)


class LcmDriver:
    """LCMScheduler.step and our lcm_step on the same schedule: prev_timesteps is the next timestep
    of the schedule, and noise is drawn as the scheduler draws it (before every step but the last)."""

    def __init__(self, config, steps):
        self.scheduler = LCMScheduler(**config)
        self.scheduler.set_timesteps(steps)
        self.final = float(self.scheduler.final_alpha_cumprod)
        self.kw = _step_config(self.scheduler)

    def last(self, i):
        return i == len(self.scheduler.timesteps) - 1

    def diffusers(self, m, i, t, x, generator):
        return self.scheduler.step(m, t, x, generator=generator, return_dict=False)

    def noise(self, m, i, generator):
        return None if self.last(i) else randn_tensor(m.shape, generator=generator, dtype=m.dtype)

    def step(self, module, m, x, i, t, noise):
        prev = t if self.last(i) else self.scheduler.timesteps[i + 1]
        return module.lcm_step(m, x, t, prev, _schedule_for(self.scheduler, m.dtype), noise, self.final, **self.kw)


class DdimDriver:
    """DDIMScheduler.step and our ddim_step: prev_timesteps = t - T // num_inference_steps; with eta > 0 the
    variance noise either passed to diffusers (variance_noise) or drawn by it from the generator."""

    def __init__(self, config, steps, eta, use_clipped, noise_via="variance_noise"):
        self.scheduler = DDIMScheduler(**config)
        self.scheduler.set_timesteps(steps)
        self.eta, self.use_clipped, self.noise_via = eta, use_clipped, noise_via
        self.final = float(self.scheduler.final_alpha_cumprod)
        self.kw = _step_config(self.scheduler)

    def diffusers(self, m, i, t, x, generator):
        kw = dict(eta=self.eta, use_clipped_model_output=self.use_clipped, return_dict=False)
        if self.eta > 0 and self.noise_via == "variance_noise":
            return self.scheduler.step(m, t, x, variance_noise=self.noise(m, i, generator), **kw)
        return self.scheduler.step(m, t, x, generator=generator, **kw)

    def noise(self, m, i, generator):
        return randn_tensor(m.shape, generator=generator, dtype=m.dtype) if self.eta > 0 else None

    def step(self, module, m, x, i, t, noise):
        prev = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        return module.ddim_step(
            m,
            x,
            t,
            prev,
            _schedule_for(self.scheduler, m.dtype),
            noise,
            self.final,
            self.eta,
            use_clipped_model_output=self.use_clipped,
            **self.kw,
        )


def run_loop(driver, dtype, seed=0, shape=(2, 4, 8, 8)):
    """Runs diffusers' loop and ours side by side, the noise drawn from same-seeded generators.
    float32: each loop on its own trajectory, every step's outputs (ours and the reference's) compared
    tightly with diffusers'. float16 / bfloat16: each of our steps on diffusers' own inputs, judged by the
    dtype-error rule (the exact answer: the float64 reference on the same inputs)."""
    g_diffusers, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x_d = randn_tensor(shape, generator=g_diffusers, dtype=dtype)
    x_o = randn_tensor(shape, generator=g_ours, dtype=dtype)
    timesteps = driver.scheduler.timesteps
    for i, t in enumerate(timesteps):
        m_d = fake_model(x_d, t, base)
        out_d = driver.diffusers(m_d, i, t, x_d, g_diffusers)
        noise = driver.noise(m_d, i, g_ours)
        if dtype == torch.float32:
            m_o = fake_model(x_o, t, base)
            ours = driver.step(ops, m_o, x_o, i, t, noise)
            refs = driver.step(ref, m_o, x_o, i, t, noise)
            for k in range(2):
                assert_tight(ours[k], out_d[k], f"step {i} (t={int(t)}) output {k}")
                assert_tight(refs[k], out_d[k], f"reference step {i} (t={int(t)}) output {k}")
            x_o = ours[0]
        else:
            ours = driver.step(ops, m_d, x_d, i, t, noise)
            exact = driver.step(ref, m_d.double(), x_d.double(), i, t, None if noise is None else noise.double())
            for k in range(2):
                assert_close(ours[k], out_d[k], exact[k], f"step {i} (t={int(t)}) output {k}")
        x_d = out_d[0]
    assert torch.equal(g_ours.get_state(), g_diffusers.get_state())  # the same draws, as many


LCM_CONFIGS = list(itertools.product(PREDICTION_TYPES, LIMITS, [True, False]))


@pytest.mark.parametrize("prediction_type,limit,set_alpha_to_one", LCM_CONFIGS)
def test_lcm_loop_matches_diffusers(prediction_type, limit, set_alpha_to_one):
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, **LIMITS[limit])
    for steps in (1, 2, 4, 7, 50):
        run_loop(LcmDriver(config, steps), torch.float32)


DDIM_CONFIGS = list(itertools.product(PREDICTION_TYPES, LIMITS, [True, False], [0.0, 0.5]))


@pytest.mark.parametrize("prediction_type,limit,set_alpha_to_one,eta", DDIM_CONFIGS)
def test_ddim_loop_matches_diffusers(prediction_type, limit, set_alpha_to_one, eta):
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, **LIMITS[limit])
    use_clipped = not set_alpha_to_one  # both values for every (type, limit, eta)
    noise_via = "variance_noise" if set_alpha_to_one else "generator"
    for steps in (1, 2, 5, 50):
        run_loop(DdimDriver(config, steps, eta, use_clipped, noise_via), torch.float32)


@pytest.mark.parametrize(
    "spacing",
    [
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="trailing"),
        dict(timestep_spacing="linspace"),
    ],
)
def test_ddim_loop_timestep_spacings(spacing):
    config = dict(SD_SCHEDULE, set_alpha_to_one=False, **spacing)
    for steps in (1, 3, 20):
        run_loop(DdimDriver(config, steps, 0.5, False), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("limit", list(LIMITS))
def test_loops_low_precision(limit, dtype):
    config = dict(SD_SCHEDULE, prediction_type="epsilon", set_alpha_to_one=False, **LIMITS[limit])
    run_loop(LcmDriver(config, 4), dtype)
    config["prediction_type"] = "v_prediction"
    run_loop(DdimDriver(config, 10, 0.5, limit != "none"), dtype)


# ---- the guided step is the LCD script's teacher step ------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_guided_matches_lcd_script(prediction_type):
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    ac = noise_scheduler.alphas_cumprod
    alpha_schedule, sigma_schedule = torch.sqrt(ac), torch.sqrt(1 - ac)
    solver = lcd_script.DDIMSolver(ac.numpy(), timesteps=1000, ddim_timesteps=50)
    g = torch.Generator().manual_seed(5)
    bsz = 6
    latents, noise = torch.randn(bsz, 4, 8, 8, generator=g), torch.randn(bsz, 4, 8, 8, generator=g)
    index = torch.randint(0, 50, (bsz,), generator=g)
    index[0], index[1] = 0, 49
    topk = 1000 // 50
    start_timesteps = solver.ddim_timesteps[index]
    timesteps = start_timesteps - topk
    timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, start_timesteps)
    w = (15 - 5) * torch.rand((bsz,), generator=g) + 5
    cond, uncond = torch.randn(bsz, 4, 8, 8, generator=g), torch.randn(bsz, 4, 8, 8, generator=g)

    schedules = (start_timesteps, noisy, prediction_type, alpha_schedule, sigma_schedule)
    cond_x0 = lcd_script.get_predicted_original_sample(cond, *schedules)
    cond_noise = lcd_script.get_predicted_noise(cond, *schedules)
    uncond_x0 = lcd_script.get_predicted_original_sample(uncond, *schedules)
    uncond_noise = lcd_script.get_predicted_noise(uncond, *schedules)
    w4 = w.reshape(bsz, 1, 1, 1)
    pred_x0 = cond_x0 + w4 * (cond_x0 - uncond_x0)
    pred_noise = cond_noise + w4 * (cond_noise - uncond_noise)
    x_prev = solver.ddim_step(pred_x0, pred_noise, index)
    assert x_prev.dtype == torch.float64  # the script's float64 ᾱ_prev table: ours computes in float32

    # prev_timesteps = max(t_start − T/N, 0) selects exactly the script's ᾱ_prev
    assert torch.equal(ac[timesteps].double(), solver.ddim_alpha_cumprods_prev[index])
    for fn in (ref.guided_ddim_step, ops.guided_ddim_step):
        ours_prev, ours_x0 = fn(cond, uncond, noisy, start_timesteps, timesteps, w, ac, prediction_type)
        assert_tight(ours_x0, pred_x0, "pred_x0", tol=1e-6)
        # x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev)·ε: its rounding is relative to the terms
        assert_tight(ours_prev.double(), x_prev, "x_prev", tol=1e-6, scale=pred_x0.abs().max().item())


# ---- lcm_step drawing its own noise: torch.randn's draw, bit for bit --------------------------------

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DRAW_SHAPES = [(3, 4, 17, 19), (1, 4, 64, 64), (16, 4, 96, 96)]


def _seeded(device, seed, explicit):
    """A generator on `device` seeded with `seed`, or None with the default generators seeded."""
    if explicit:
        return torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)
    return None


def _rng_state(device, generator):
    """The state a draw on `device` advances: the generator's, or the device's default generator's."""
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state() if torch.device(device).type == "cuda" else torch.get_rng_state()


def _randn_then_step(args, generator):
    """The noise drawn as diffusers' LCM step draws it (torch.randn for a generator on the sample's
    device), then lcm_step with that noise (args: lcm_args without noise)."""
    m, x = args[0], args[1]
    noise = torch.randn(m.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.ops.rglcd_fast.lcm_step(*args[:5], noise, *args[6:])


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(actual, expected):
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride(), f"output {k}"
        assert torch.equal(_bits(a), _bits(e)), f"output {k}: {(a != e).sum().item()} elements differ"


def assert_draw_matches_randn(args, device, explicit, seed=0):
    """lcm_step with draw_noise (args: lcm_args without noise) draws torch.randn's noise bit for bit and leaves
    the generator (explicit, or the default one) where torch.randn leaves it; its step equals torch.randn
    then lcm_step up to the rounding of the multiply-adds (the compiler may contract them differently in the
    drawing kernel: seen as 1-ulp differences on the H200)."""
    generator = _seeded(device, seed, explicit)
    expected = _randn_then_step(args, generator)
    state = _rng_state(device, generator)
    generator = _seeded(device, seed, explicit)
    actual = torch.ops.rglcd_fast.lcm_step(*args, True, generator)
    assert torch.equal(_rng_state(device, generator), state)
    for a, e in zip(actual, expected):
        assert a.stride() == e.stride()
        torch.testing.assert_close(a, e)
    # The draw itself: with zero inputs, "sample" prediction and ᾱ = 0 (so sqrt(ᾱ_prev) = 0 and
    # sqrt(1 - ᾱ_prev) = 1, also the final one), prev is the noise exactly.
    m, x, t, prev, ac = args[:5]
    zeros = (torch.zeros_like(m), torch.zeros_like(x), t, prev, torch.zeros_like(ac), None, 0.0, "sample", *args[8:])
    noise = torch.randn(m.shape, generator=_seeded(device, seed, explicit), device=x.device, dtype=x.dtype)
    drawn, _ = torch.ops.rglcd_fast.lcm_step(*zeros, True, _seeded(device, seed, explicit))
    assert torch.equal(_bits(drawn), _bits(noise))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", DRAW_SHAPES)
def test_lcm_draw_matches_randn_then_step(shape, dtype, device):
    """draw_noise is torch.randn(model_output.shape, generator=..., dtype=sample.dtype) and the step
    (CUDA: drawn in the step's own kernel): explicit and default generators, clip / threshold, a final
    step among the samples."""
    _, m, x, _, t, prev, _, ac = make_inputs(device, dtype, shape)
    for prediction_type, limit in [("epsilon", "none"), ("v_prediction", "threshold"), ("sample", "clip")]:
        for explicit in (True, False):
            assert_draw_matches_randn(
                lcm_args(3 * m, x, t, prev, ac, None, 0.999, prediction_type, limit), device, explicit
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lcm_draw_layouts(layout, device):
    """Inputs in other layouts (CUDA: a non-contiguous sample takes torch.randn's own draw, then the step)
    get the noise torch.randn gives each element, and outputs in the sample's layout."""
    _, m, x, _, t, prev, _, ac = make_inputs(device, torch.float32)
    ml, xl = in_layout(3 * m, layout), in_layout(x, layout)
    for model_output, sample in [(ml, xl), (ml, x), (3 * m, xl)]:
        for explicit in (True, False):
            assert_draw_matches_randn(lcm_args(model_output, sample, t, prev, ac, limit="threshold"), device, explicit)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2048, 3), (5, 33), (2, 4, 3, 5, 6), (1,), (0, 4, 5, 5)])
def test_lcm_draw_other_shapes(shape, dtype, device):
    """Any rank; a batch whose per-sample coefficients exceed a CUDA block's shared memory (torch.randn's
    own draw, then the step); an empty batch (nothing drawn, the generator untouched, as torch.randn)."""
    _, m, x, _, t, prev, _, ac = make_inputs(device, dtype, shape)
    for explicit in (True, False):
        assert_draw_matches_randn(lcm_args(m, x, t, prev, ac, limit="threshold"), device, explicit)


def test_lcm_draw_reference():
    """The reference (the kernel where none is compiled) draws as the op does: torch.randn, then its step."""
    _, m, x, _, t, prev, _, ac = make_inputs("cpu", torch.float32)
    args = lcm_args(3 * m, x, t, prev, ac, limit="threshold")
    drawing, given = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    noise = torch.randn(m.shape, generator=given, dtype=x.dtype)
    assert_same_bits(ref.lcm_step(*args, True, drawing), ref.lcm_step(*args[:5], noise, *args[6:]))
    assert torch.equal(drawing.get_state(), given.get_state())


# ---- autograd, opcheck, compile -------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_gradcheck_float64(prediction_type):
    """guided_ddim_step only: lcm_step and ddim_step are inference ops with no autograd (they replace
    scheduler.step in sampling loops; clip / dynamic thresholding have no useful gradient), so there is no
    backward to check; test_inference_ops_refuse_grad checks that they refuse inputs that require grad."""
    c, u, x, _, t, prev, w, ac = make_inputs("cpu", torch.float64, shape=(2, 3, 4, 5))
    c, u, x = (v.requires_grad_() for v in (c, u, x))
    prev = prev.clamp(min=0)
    assert torch.autograd.gradcheck(
        lambda a, b, d: ops.guided_ddim_step(a, b, d, t, prev, w, ac, prediction_type), (c, u, x)
    )
    # one output used: the other's gradient arrives as None
    assert torch.autograd.gradcheck(
        lambda a, b, d: ops.guided_ddim_step(a, b, d, t, prev, w, ac, prediction_type)[1], (c, u, x)
    )


def _opcheck_samples():
    c, u, x, z, t, prev, w, ac = make_inputs("cpu", torch.float32, shape=(2, 3, 4, 5))
    cg, ug, xg = (v.clone().requires_grad_() for v in (c, u, x))
    prev0 = prev.clamp(min=0)
    ns = torch.ops.rglcd_fast
    yield ns.guided_ddim_step.default, (cg, ug, xg, t, prev0, w, ac, "epsilon")
    yield ns.guided_ddim_step.default, (cg, u, x, t[:1], prev0, w[:1], ac, "sample")
    yield ns.guided_ddim_step_backward.default, (c, u, t, prev0, w, ac, "v_prediction", [True, True, True])
    yield ns.guided_ddim_step_backward.default, (None, u, t, prev0, w, ac, "epsilon", [True, False, True])
    yield ns.lcm_step.default, lcm_args(3 * u, x, t, prev, ac, z, 0.999, "epsilon", "threshold")
    yield ns.lcm_step.default, lcm_args(u, x, t, prev, ac, None, 1.0, "v_prediction", "clip")
    # drawing from the default generator (opcheck restores the default generators between its runs)
    yield ns.lcm_step.default, lcm_args(3 * u, x, t, prev, ac, None, 0.999, "sample", "threshold") + (True, None)
    yield ns.ddim_step.default, ddim_args(3 * u, x, t, prev, ac, z, 1.0, 0.5, "sample", "threshold", True)
    yield ns.ddim_step.default, ddim_args(u, x, t, prev, ac, None, 1.0, 0.0, "epsilon", "none", False)


@pytest.mark.parametrize("sample", list(range(len(list(_opcheck_samples())))))
def test_opcheck(sample):
    op, args = list(_opcheck_samples())[sample]
    torch.library.opcheck(op, args)


def test_opcheck_draw_from_explicit_generator():
    """opcheck's eager-vs-AOTDispatcher comparison cannot hold for an explicit generator: it restores the
    default generators between the runs, not one passed as an argument, so the second run draws on from
    where the first left it. Its other checks (schema, autograd registration, fake tensor) hold."""
    _, u, x, _, t, prev, _, ac = make_inputs("cpu", torch.float32, shape=(2, 3, 4, 5))
    args = lcm_args(u, x, t, prev, ac, None, 1.0, "epsilon", "clip") + (True, torch.Generator().manual_seed(0))
    torch.library.opcheck(
        torch.ops.rglcd_fast.lcm_step.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_draw_matches_eager(device):
    """torch.compile(fullgraph=True) of lcm_step drawing from the default generator draws what eager draws
    from the same seed, every call (the op is tagged nondeterministic_seeded: two identical calls are
    neither merged nor dropped). An explicit torch.Generator argument is not traceable by dynamo (torch
    2.13: "Failed to convert args/kwargs to proxy", a graph break), so fullgraph compiles only this form."""
    _, m, x, _, t, prev, _, ac = make_inputs(device, torch.float32)

    def sampler(m, x):
        first = ops.lcm_step(m, x, t, prev, ac, None, 0.999, thresholding=True, draw_noise=True)
        again = ops.lcm_step(m, x, t, prev, ac, None, 0.999, thresholding=True, draw_noise=True)
        return first + again

    compiled = torch.compile(sampler, fullgraph=True)
    for seed in (5, 6):
        torch.manual_seed(seed)
        eager = sampler(3 * m, x)
        torch.manual_seed(seed)
        assert_same_bits(compiled(3 * m, x), eager)
        assert not torch.equal(eager[0], eager[2])  # two draws


def test_compile_fullgraph_matches_eager():
    c, u, x, z, t, prev, w, ac = make_inputs("cpu", torch.float32)

    def teacher(c, u, x, t, prev, w, ac):
        x_prev, pred_x0 = ops.guided_ddim_step(c, u, x, t, prev, w, ac, "v_prediction")
        return x_prev.square().mean() + pred_x0.mean(), x_prev

    def sampler(m, x, z, t, prev, ac):
        lcm = ops.lcm_step(m, x, t, prev, ac, z, 0.999, thresholding=True, sample_max_value=2.0)
        ddim = ops.ddim_step(m, lcm[0], t, prev, ac, z, 1.0, eta=0.5, clip_sample=True, use_clipped_model_output=True)
        return lcm + ddim

    prev0 = prev.clamp(min=0)
    cg = c.clone().requires_grad_()
    eager = teacher(cg, u, x, t, prev0, w, ac)
    (eager_grad,) = torch.autograd.grad(eager[0], cg)
    cc = c.clone().requires_grad_()
    compiled = torch.compile(teacher, fullgraph=True)(cc, u, x, t, prev0, w, ac)
    (compiled_grad,) = torch.autograd.grad(compiled[0], cc)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(sampler, fullgraph=True)(3 * u, x, z, t, prev, ac), sampler(3 * u, x, z, t, prev, ac)
        )


# ---- non-finite values, bad inputs -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate(device):
    c, u, x, z, t, prev, w, ac = make_inputs(device, torch.float32)
    c[1, 2, 3, 4] = float("nan")
    u[0, 1, 1, 1] = float("inf")
    x[2, 0, 0, 0] = float("inf")
    z[0, 3, 2, 1] = float("nan")
    for pt in PREDICTION_TYPES:
        ours = ops.guided_ddim_step(c, u, x, t, prev.clamp(min=0), w, ac, pt)
        theirs = ref.guided_ddim_step(c, u, x, t, prev.clamp(min=0), w, ac, pt)
        for o, r in zip(ours, theirs):  # guidance is applied to the outputs: Inf - Inf may differ from NaN
            assert torch.equal(torch.isfinite(o), torch.isfinite(r))
            assert not torch.isfinite(r).all()
        for limit in LIMITS:
            outs = check_against_reference(ops.lcm_step, ref.lcm_step, lcm_args(c, x, t, prev, ac, z, 1.0, pt, limit))
            assert not all(torch.isfinite(o).all() for o in outs)
            check_against_reference(
                ops.ddim_step, ref.ddim_step, ddim_args(c, x, t, prev, ac, z, 1.0, 0.5, pt, limit, True)
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf"), 1e4])
def test_thresholding_with_one_non_finite_value(device, dtype, special):
    """One NaN / ±inf / huge value in the model output, the sample or the noise, at every position of a
    small sample: the device-side quantile (sort, rank, lerp) puts NaN and ±inf where the reference does."""
    shape = (2, 1, 5, 8)
    for pt, which, position in itertools.product(PREDICTION_TYPES, range(3), range(40)):
        g = torch.Generator().manual_seed(position)
        m, x, z = (randn(*shape, dtype=dtype, device=device, generator=g) for _ in range(3))
        (m, x, z)[which][1].view(-1)[position] = special
        t = torch.tensor([589, 589], device=device)
        try:
            check_against_reference(
                ops.lcm_step,
                ref.lcm_step,
                lcm_args(m, x, t, t - 250, sd_alphas_cumprod(device), z, 1.0, pt, "threshold"),
            )
        except AssertionError as error:
            raise AssertionError(f"{pt}, {special} in {['m', 'x', 'z'][which]}[1] at {position}: {error}") from None


def test_inference_ops_refuse_grad():
    _, m, x, z, t, prev, _, ac = make_inputs("cpu", torch.float32)
    mg = m.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="lcm_step"):
        ops.lcm_step(mg, x, t, prev, ac, z)
    with pytest.raises(RuntimeError, match="ddim_step"):
        ops.ddim_step(m, x, t, prev, ac, mg, eta=0.5)
    with torch.no_grad():
        torch.testing.assert_close(ops.lcm_step(mg, x, t, prev, ac, z), ops.lcm_step(m, x, t, prev, ac, z))
        ops.ddim_step(mg, x, t, prev, ac)


def test_bad_inputs_name_the_argument():
    c, u, x, z, t, prev, w, ac = make_inputs("cpu", torch.float32)
    p0 = prev.clamp(min=0)
    g = ops.guided_ddim_step
    cases = [
        (TypeError, "uncond_output", lambda: g(c, u.half(), x, t, p0, w, ac)),
        (ValueError, "sample", lambda: g(c, u, x[:, :2], t, p0, w, ac)),
        (TypeError, "timesteps", lambda: g(c, u, x, t.float(), p0, w, ac)),
        (ValueError, "timesteps", lambda: g(c, u, x, t + 1000, p0, w, ac)),
        (ValueError, "prev_timesteps", lambda: g(c, u, x, t, prev, w, ac)),  # negative: not in the guided step
        (ValueError, "prev_timesteps", lambda: g(c, u, x, t, p0[:2], w, ac)),
        (TypeError, "guidance_scale", lambda: g(c, u, x, t, p0, w.long(), ac)),
        (ValueError, "guidance_scale", lambda: g(c, u, x, t, p0, w[:2], ac)),
        (ValueError, "prediction_type", lambda: g(c, u, x, t, p0, w, ac, "flow")),
        (TypeError, "alphas_cumprod", lambda: g(c, u, x, t, p0, w, ac.half())),
        (TypeError, "noise", lambda: ops.lcm_step(u, x, t, prev, ac, z.double())),
        (ValueError, "noise", lambda: ops.lcm_step(u, x, t, prev, ac, z[:1])),
        (ValueError, "prev_timesteps", lambda: ops.lcm_step(u, x, t, prev + 1000, ac, z)),
        (ValueError, "timesteps", lambda: ops.lcm_step(u, x, t - 1000, prev, ac, z)),
        (
            TypeError,
            "clip_sample_range",
            lambda: ops.lcm_step(u, x, t, prev, ac, clip_sample=True, clip_sample_range="wide"),
        ),
        (
            ValueError,
            "dynamic_thresholding_ratio",
            lambda: ops.lcm_step(u, x, t, prev, ac, thresholding=True, dynamic_thresholding_ratio=1.5),
        ),
        (
            ValueError,
            "dynamic_thresholding_ratio",
            lambda: ops.ddim_step(u, x, t, prev, ac, dynamic_thresholding_ratio=-0.1),
        ),
        (TypeError, "sample_max_value", lambda: ops.ddim_step(u, x, t, prev, ac, sample_max_value=None)),
        (ValueError, "final_alpha_cumprod", lambda: ops.ddim_step(u, x, t, prev, ac, final_alpha_cumprod=0.0)),
        (TypeError, "final_alpha_cumprod", lambda: ops.lcm_step(u, x, t, prev, ac, final_alpha_cumprod="one")),
        (TypeError, "eta", lambda: ops.ddim_step(u, x, t, prev, ac, z, eta="fast")),
        (ValueError, "noise", lambda: ops.ddim_step(u, x, t, prev, ac, None, eta=0.5)),
        (ValueError, "prediction_type", lambda: ops.ddim_step(u, x, t, prev, ac, prediction_type="flow")),
        (ValueError, "model_output", lambda: ops.lcm_step(u[0, 0, 0, 0], x[0, 0, 0, 0], t[:1], prev[:1], ac)),
        (ValueError, "noise", lambda: ops.lcm_step(u, x, t, prev, ac, z, draw_noise=True)),
        (ValueError, "generator", lambda: ops.lcm_step(u, x, t, prev, ac, z, generator=torch.Generator())),
        (TypeError, "generator", lambda: ops.lcm_step(u, x, t, prev, ac, draw_noise=True, generator=0)),
        (TypeError, "draw_noise", lambda: ops.lcm_step(u, x, t, prev, ac, draw_noise=1)),
    ]
    if rglcd_fast.has_extension():  # the compiled kernels check what they are given when called directly
        cases += [
            (ValueError, "prev_timesteps", lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u, x, t, prev + 1000, ac))),
            (ValueError, "timesteps", lambda: torch.ops.rglcd_fast.ddim_step(*ddim_args(u, x, t - 1000, prev, ac))),
            (
                ValueError,
                "prev_timesteps",
                lambda: torch.ops.rglcd_fast.guided_ddim_step(c, u, x, t, prev, w, ac, "epsilon"),
            ),
            (ValueError, "noise", lambda: torch.ops.rglcd_fast.ddim_step(*ddim_args(u, x, t, prev, ac, eta=0.5))),
            (
                ValueError,
                "dynamic_thresholding_ratio",
                lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u, x, t, prev, ac)[:12], 1.5, 1.0),
            ),
            (TypeError, "timesteps", lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u, x, t.float(), prev, ac))),
            (TypeError, "sample", lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u.long(), x.long(), t, prev, ac))),
            (ValueError, "sample", lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u, x[:1], t[:1], prev[:1], ac))),
            (ValueError, "noise", lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u, x, t, prev, ac, z), True, None)),
            (
                ValueError,
                "generator",
                lambda: torch.ops.rglcd_fast.lcm_step(*lcm_args(u, x, t, prev, ac), False, torch.Generator()),
            ),
        ]
    if torch.cuda.is_available():
        cases.append((ValueError, "sample", lambda: g(c, u, x.cuda(), t, p0, w, ac)))
        cases.append((ValueError, "timesteps", lambda: ops.lcm_step(u.cuda(), x.cuda(), t, prev.cuda(), ac.cuda())))
        on_cuda = lcm_args(u.cuda(), x.cuda(), t.cuda(), prev.cuda(), ac.cuda())
        cases.append(
            (ValueError, "generator", lambda: ops.lcm_step(*on_cuda[:5], draw_noise=True, generator=torch.Generator()))
        )
        if rglcd_fast.has_cuda_kernels():
            cases.append(
                (ValueError, "generator", lambda: torch.ops.rglcd_fast.lcm_step(*on_cuda, True, torch.Generator()))
            )
    for error, name, call in cases:
        with pytest.raises(error, match=rf"(?<!\w){name}\b"):  # "timesteps" must not match "prev_timesteps"
            call()


# ---- CUDA only: no host sync (NaN for an out-of-range timestep, graph capture), float64 ----------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sampling_outputs(c, u, x, z, t, prev, w, ac):
    """Every solver op once, the sampling steps with thresholding (the device-side quantile)."""
    limits = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    return (
        *ops.guided_ddim_step(c, u, x, t, prev.clamp(min=0), w, ac, "v_prediction"),
        *ops.lcm_step(3 * u, x, t, prev, ac, z, 0.999, **limits),
        *ops.ddim_step(3 * u, x, t, prev, ac, z, 1.0, eta=0.5, use_clipped_model_output=True, **limits),
    )


@requires_cuda
def test_cuda_out_of_range_timestep_gives_nan():
    """The CUDA kernels cannot raise without a host sync: a timestep outside the schedule makes its own
    sample's outputs NaN and leaves the other samples exactly as they were (the CPU raises a ValueError:
    test_bad_inputs_name_the_argument)."""
    c, u, x, z, t, prev, w, ac = make_inputs("cuda", torch.float32)
    p0 = prev.clamp(min=0)
    good = _sampling_outputs(c, u, x, z, t, prev, w, ac)
    others = [0, 2]
    bad_t = t.clone()
    bad_t[1] = 1000
    for out, ref_out in zip(_sampling_outputs(c, u, x, z, bad_t, prev, w, ac), good):
        assert torch.isnan(out[1]).all()
        assert torch.equal(out[others], ref_out[others])
    bad_prev = prev.clone()
    bad_prev[1] = 1000  # only prev_sample / x_prev depend on ᾱ_prev
    outs = _sampling_outputs(c, u, x, z, t, bad_prev, w, ac)
    for k, (out, ref_out) in enumerate(zip(outs, good)):
        if k % 2 == 0:
            assert torch.isnan(out[1]).all()
            assert torch.equal(out[others], ref_out[others])
        else:
            assert torch.equal(out, ref_out)
    negative = p0.clone()
    negative[1] = -20  # the guided step has no final step: a negative prev_timestep is out of range
    x_prev, pred_x0 = ops.guided_ddim_step(c, u, x, t, negative, w, ac)
    assert torch.isnan(x_prev[1]).all() and torch.isfinite(x_prev[others]).all() and torch.isfinite(pred_x0).all()
    grads = torch.ops.rglcd_fast.guided_ddim_step_backward(c, u, bad_t, p0, w, ac, "epsilon", [True, True, True])
    assert all(torch.isnan(g[1]).all() and torch.isfinite(g[others]).all() for g in grads)


@pytest.mark.skipif(not CUDA_GRAPHS, reason="graph capture needs CUDA and its caching allocator")
def test_cuda_graph_capture():
    """Every op (the device-side thresholding included) captures into a CUDA graph, i.e. never syncs
    with the host, and the replay recomputes from the new contents of the captured inputs."""
    inputs = make_inputs("cuda", torch.float32)
    c, u, x, z, t, prev, w, ac = inputs
    p0 = prev.clamp(min=0)

    def run():
        backward = torch.ops.rglcd_fast.guided_ddim_step_backward(c, u, t, p0, w, ac, "sample", [True, True, True])
        return _sampling_outputs(*inputs) + tuple(backward)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs recommends
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    g = torch.Generator(device="cuda").manual_seed(7)
    for v in (c, u, x, z):
        v.copy_(torch.randn(v.shape, generator=g, device="cuda"))
    t.copy_(torch.randint(20, 1000, t.shape, generator=g, device="cuda"))
    w.uniform_(1, 3, generator=g)
    graph.replay()
    expected = run()
    for k, (a, b) in enumerate(zip(captured, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"output {k}")


@pytest.mark.skipif(not CUDA_GRAPHS, reason="graph capture needs CUDA and its caching allocator")
def test_cuda_graph_lcm_draw():
    """The fused draw captures into a CUDA graph: each replay gives what the eager op gives from the
    generators' states at the replay (the default one, and an explicit one registered with the graph), and
    leaves them where the eager op leaves them (which is where torch.randn leaves them: tests above)."""
    _, m, x, _, t, prev, _, ac = make_inputs("cuda", torch.float16, (3, 4, 17, 19))
    args = lcm_args(3 * m, x, t, prev, ac, None, 0.999, "epsilon", "threshold")
    explicit = torch.Generator("cuda")

    def run(draw):
        return draw(args, None) + draw(args, explicit)

    def fused(args, generator):
        return torch.ops.rglcd_fast.lcm_step(*args, True, generator)

    def seed(value):
        torch.cuda.manual_seed(value)
        explicit.manual_seed(value + 100)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(fused)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(explicit)
    with torch.cuda.graph(graph):
        captured = run(fused)
    for value in (3, 4):
        seed(value)
        graph.replay()
        states = (torch.cuda.get_rng_state(), explicit.get_state())
        seed(value)
        assert_same_bits(captured, run(fused))
        assert torch.equal(states[0], torch.cuda.get_rng_state()) and torch.equal(states[1], explicit.get_state())


@requires_cuda
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_cuda_float64_matches_cpu(prediction_type):
    """float64 runs on CUDA too (the tests above cover fp32/fp16/bf16): the same results as the CPU kernels."""
    cpu = make_inputs("cpu", torch.float64)
    cuda = [v.cuda() for v in cpu]
    for limit in LIMITS:

        def outputs(c, u, x, z, t, prev, w, ac):
            p0 = prev.clamp(min=0)
            ns = torch.ops.rglcd_fast
            return (
                *ns.guided_ddim_step(c, u, x, t, p0, w, ac, prediction_type),
                *ns.guided_ddim_step_backward(c, u, t, p0, w, ac, prediction_type, [True, True, True]),
                *ns.lcm_step(*lcm_args(3 * u, x, t, prev, ac, z, 0.999, prediction_type, limit)),
                *ns.ddim_step(*ddim_args(3 * u, x, t, prev, ac, z, 1.0, 0.5, prediction_type, limit, True)),
            )

        for k, (a, b) in enumerate(zip(outputs(*cuda), outputs(*cpu))):
            assert a.dtype == torch.float64 and a.is_cuda
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12, msg=f"{limit}: output {k}")
