"""Solver family ops (docs/design.md §2): the teacher's guided DDIM solver step of LCD training
(differentiable in the model outputs and the sample) and the LCM / DDIM sampling steps with diffusers'
step() semantics (inference: forward only). Each op: schema, fake kernel, autograd where
differentiable (the backward is itself an op) and a validating public function. Outputs follow
empty_like(sample)."""

import math
import numbers

import torch

from .. import _library as lib
from ..reference import solver as ref
from . import _checks as check

# ---- schemas and reference kernels ------------------------------------------------------------

_GUIDED_SCHEDULE = "Tensor timesteps, Tensor prev_timesteps, Tensor guidance_scale, Tensor alphas_cumprod"
_X0_LIMITS = (
    "bool clip_sample, float clip_sample_range, bool thresholding, float dynamic_thresholding_ratio, "
    "float sample_max_value"
)


def _guided_ddim_step_backward_reference(
    grad_x_prev, grad_pred_x0, timesteps, prev_timesteps, guidance_scale, alphas_cumprod, prediction_type, output_mask
):
    """The vjp of the (linear) reference step, taken at zero."""
    like = grad_x_prev if grad_x_prev is not None else grad_pred_x0
    inputs = [torch.zeros_like(like, requires_grad=True) for _ in range(3)]
    with torch.enable_grad():
        outputs = ref.guided_ddim_step(
            *inputs, timesteps, prev_timesteps, guidance_scale, alphas_cumprod, prediction_type
        )
        pairs = [(o, g) for o, g in zip(outputs, (grad_x_prev, grad_pred_x0)) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, materialize_grads=True
        )
    return tuple(g if wanted else like.new_empty(0) for g, wanted in zip(grads, output_mask))


_guided_ddim_step = lib.define(
    "guided_ddim_step",
    f"(Tensor cond_output, Tensor uncond_output, Tensor sample, {_GUIDED_SCHEDULE}, str prediction_type) "
    "-> (Tensor, Tensor)",
    ref.guided_ddim_step,
    differentiable=True,
)
_guided_ddim_step_backward = lib.define(
    "guided_ddim_step_backward",
    f"(Tensor? grad_x_prev, Tensor? grad_pred_x0, {_GUIDED_SCHEDULE}, str prediction_type, bool[3] output_mask) "
    "-> (Tensor, Tensor, Tensor)",
    _guided_ddim_step_backward_reference,
)
# lcm_step can draw its noise (draw_noise) from a generator: seeded randomness, which torch.compile
# must neither merge nor drop, as for aten's random ops.
_lcm_step = lib.define(
    "lcm_step",
    "(Tensor model_output, Tensor sample, Tensor timesteps, Tensor prev_timesteps, Tensor alphas_cumprod, "
    "Tensor? noise, float final_alpha_cumprod, str prediction_type, float timestep_scaling, "
    f"{_X0_LIMITS}, bool draw_noise=False, Generator? generator=None) -> (Tensor, Tensor)",
    ref.lcm_step,
    tags=(torch.Tag.nondeterministic_seeded,),
)
_ddim_step = lib.define(
    "ddim_step",
    "(Tensor model_output, Tensor sample, Tensor timesteps, Tensor prev_timesteps, Tensor alphas_cumprod, "
    "Tensor? noise, float final_alpha_cumprod, float eta, str prediction_type, "
    f"{_X0_LIMITS}, bool use_clipped_model_output) -> (Tensor, Tensor)",
    ref.ddim_step,
)

# ---- fake kernels -------------------------------------------------------------------------------


@torch.library.register_fake(lib.qualname("guided_ddim_step"))
def _(cond_output, uncond_output, sample, *args):
    return torch.empty_like(sample), torch.empty_like(sample)


@torch.library.register_fake(lib.qualname("guided_ddim_step_backward"))
def _(grad_x_prev, grad_pred_x0, *args):
    like = grad_x_prev if grad_x_prev is not None else grad_pred_x0
    return tuple(torch.empty_like(like) if wanted else like.new_empty(0) for wanted in args[-1])


def _fake_step(model_output, sample, *args):
    return torch.empty_like(sample), torch.empty_like(sample)


torch.library.register_fake(lib.qualname("lcm_step"), _fake_step)
torch.library.register_fake(lib.qualname("ddim_step"), _fake_step)

# ---- public functions ---------------------------------------------------------------------------


def _number(name, value, valid=None, expected=""):
    """A real number (Python or NumPy; not a tensor), optionally checked: ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if valid is not None and not valid(value):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return value


def needs_autograd(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forward_only(op_name, **tensors):
    if needs_autograd(*tensors.values()):
        name = next(name for name, value in tensors.items() if value is not None and value.requires_grad)
        raise RuntimeError(
            f"{op_name} is an inference op (forward only), but {name} requires grad; call it under "
            "torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )


def _step_schedule_arguments(sample, timesteps, prev_timesteps, alphas_cumprod, prediction_type):
    batch, device = sample.shape[0], sample.device
    check.choice("prediction_type", prediction_type, check.PREDICTION_TYPES)
    timesteps = check.per_sample("timesteps", timesteps, batch, device, integer=True)
    prev_timesteps = check.per_sample("prev_timesteps", prev_timesteps, batch, device, integer=True)
    return timesteps, prev_timesteps, check.schedule(alphas_cumprod, device)


def _x0_limit_arguments(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value):
    """What diffusers accepts: any range and maximum (torch.clamp's rule where the bounds cross: a clip range
    r <= 0 gives r, a sample_max_value below 1 gives itself as the threshold), a quantile ratio in [0, 1]
    (torch.quantile's domain). The ops' keyword arguments."""
    return dict(
        clip_sample=bool(clip_sample),
        clip_sample_range=_number("clip_sample_range", clip_sample_range),
        thresholding=bool(thresholding),
        dynamic_thresholding_ratio=_number(
            "dynamic_thresholding_ratio",
            dynamic_thresholding_ratio,
            lambda v: 0 <= v <= 1,
            "a value in [0, 1] (torch.quantile's q)",
        ),
        sample_max_value=_number("sample_max_value", sample_max_value),
    )


def _final_alpha_cumprod(value):
    return _number("final_alpha_cumprod", value, lambda v: 0 < v <= 1, "a value in (0, 1]")


def guided_ddim_step(
    cond_output,
    uncond_output,
    sample,
    timesteps,
    prev_timesteps,
    guidance_scale,
    alphas_cumprod,
    prediction_type="epsilon",
):
    """The teacher's CFG + DDIM solver step of LCD training (docs/design.md §2), one fused pass.

    With x0_c, ε_c (x0_u, ε_u) from cond_output (uncond_output) at (sample, timesteps):
    x0 = x0_c + w·(x0_c − x0_u), ε = ε_c + w·(ε_c − ε_u),
    x_prev = sqrt(ᾱ[prev])·x0 + sqrt(1 − ᾱ[prev])·ε. In training prev_timesteps = max(t_start − T/N, 0),
    which is the LCD script's DDIMSolver.ddim_alpha_cumprods_prev[index].

    timesteps, prev_timesteps: integer [B], [1] or [] in [0, T). guidance_scale w: a float or a float
    tensor [B], [1] or []. Returns (x_prev, pred_x0), differentiable in cond_output, uncond_output and
    sample; guidance_scale is treated as a constant (no gradient)."""
    check.latents(cond_output=cond_output, uncond_output=uncond_output, sample=sample)
    timesteps, prev_timesteps, alphas_cumprod = _step_schedule_arguments(
        sample, timesteps, prev_timesteps, alphas_cumprod, prediction_type
    )
    guidance_scale = check.scalar_or_per_sample("guidance_scale", guidance_scale, sample.shape[0], sample.device)
    return _guided_ddim_step(
        cond_output,
        uncond_output,
        sample,
        timesteps,
        prev_timesteps,
        guidance_scale.detach(),
        alphas_cumprod,
        prediction_type,
    )


def lcm_step_constants(
    final_alpha_cumprod=1.0,
    prediction_type="epsilon",
    timestep_scaling=10.0,
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
) -> dict:
    """lcm_step's configuration arguments, checked, as keyword arguments of torch.ops.rglcd_fast.lcm_step:
    what a scheduler checks once per configuration and passes to each step."""
    check.choice("prediction_type", prediction_type, check.PREDICTION_TYPES)
    scaling = _number("timestep_scaling", timestep_scaling, math.isfinite, "a finite value")
    limits = _x0_limit_arguments(
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )
    return dict(
        final_alpha_cumprod=_final_alpha_cumprod(final_alpha_cumprod),
        prediction_type=prediction_type,
        timestep_scaling=scaling,
        **limits,
    )


def _noise_source(noise, draw_noise, generator, device):
    """Checks lcm_step's noise, draw_noise and generator: their types here, then the reference's rules
    (either a noise tensor, or draw_noise with an optional generator on the sample's device)."""
    if not isinstance(draw_noise, bool):
        raise TypeError(f"draw_noise: expected a bool, got {type(draw_noise).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    ref.check_noise_source(noise, draw_noise, generator, device)


def lcm_step(
    model_output,
    sample,
    timesteps,
    prev_timesteps,
    alphas_cumprod,
    noise=None,
    final_alpha_cumprod=1.0,
    prediction_type="epsilon",
    timestep_scaling=10.0,
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    draw_noise=False,
    generator=None,
):
    """diffusers LCMScheduler.step as one fused op (forward only). Returns (prev_sample, denoised).

    prev_timesteps: the next timestep of the schedule per sample; a negative one means the final
    ᾱ_prev = final_alpha_cumprod (diffusers: float(scheduler.final_alpha_cumprod)). noise: the z of
    prev_sample = sqrt(ᾱ_prev)·denoised + sqrt(1 − ᾱ_prev)·z, drawn by the caller as diffusers draws it
    (randn_tensor(shape, generator=..., dtype=...)); None on the last step, where prev_sample = denoised
    (a separate tensor). draw_noise=True (noise None): the op draws z itself, exactly
    torch.randn(model_output.shape, generator=generator, device=sample.device, dtype=sample.dtype),
    leaving the generator (the default one when None) as that call would; on CUDA in the step's own
    kernel. Clip / dynamic thresholding of x0 as the scheduler config says."""
    check.latents(model_output=model_output, sample=sample, **({} if noise is None else {"noise": noise}))
    _forward_only("lcm_step", model_output=model_output, sample=sample, noise=noise)
    _noise_source(noise, draw_noise, generator, sample.device)
    constants = lcm_step_constants(
        final_alpha_cumprod,
        prediction_type,
        timestep_scaling,
        clip_sample,
        clip_sample_range,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
    )
    timesteps, prev_timesteps, alphas_cumprod = _step_schedule_arguments(
        sample, timesteps, prev_timesteps, alphas_cumprod, prediction_type
    )
    return _lcm_step(
        model_output=model_output,
        sample=sample,
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        alphas_cumprod=alphas_cumprod,
        noise=noise,
        **constants,
        draw_noise=draw_noise,
        generator=generator,
    )


def ddim_step(
    model_output,
    sample,
    timesteps,
    prev_timesteps,
    alphas_cumprod,
    noise=None,
    final_alpha_cumprod=1.0,
    eta=0.0,
    prediction_type="epsilon",
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    use_clipped_model_output=False,
):
    """diffusers DDIMScheduler.step as one fused op (forward only). Returns (prev_sample, pred_original_sample).

    prev_timesteps: diffusers' timesteps − T // num_inference_steps per sample; a negative one means the
    final ᾱ_prev = final_alpha_cumprod (diffusers: float(scheduler.final_alpha_cumprod)). noise: the
    variance noise (diffusers' variance_noise / its randn_tensor draw), required when eta > 0 and
    unused when eta = 0."""
    check.latents(model_output=model_output, sample=sample, **({} if noise is None else {"noise": noise}))
    _forward_only("ddim_step", model_output=model_output, sample=sample, noise=noise)
    eta = _number("eta", eta)  # as diffusers: the variance noise is added only when eta > 0 (the kernel and the
    # reference each refuse eta > 0 without noise)
    timesteps, prev_timesteps, alphas_cumprod = _step_schedule_arguments(
        sample, timesteps, prev_timesteps, alphas_cumprod, prediction_type
    )
    limits = _x0_limit_arguments(
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )
    return _ddim_step(
        model_output=model_output,
        sample=sample,
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
        alphas_cumprod=alphas_cumprod,
        noise=noise,
        final_alpha_cumprod=_final_alpha_cumprod(final_alpha_cumprod),
        eta=eta,
        prediction_type=prediction_type,
        **limits,
        use_clipped_model_output=bool(use_clipped_model_output),
    )
