"""Consistency family ops (docs/design.md §2): boundary scalings, x0 / ε from a model output, the
consistency output f(m, x, t) and the fused distillation loss. Each op: schema, fake kernel,
autograd (the backward is itself an op) and a validating public function."""

import torch

from .. import _library as lib
from ..reference import consistency as ref
from . import _checks as check

# ---- schemas and reference kernels ------------------------------------------------------------

_boundary_scalings = lib.define(
    "boundary_scalings",
    "(Tensor timesteps, float timestep_scaling, float sigma_data) -> (Tensor, Tensor)",
    ref.boundary_scalings,
)

_MAP_ARGS = "Tensor model_output, Tensor sample, Tensor timesteps, Tensor alphas_cumprod, str prediction_type"
_MAP_BACKWARD_ARGS = "Tensor grad, Tensor timesteps, Tensor alphas_cumprod, str prediction_type"
_CONSISTENCY_EXTRA = "float timestep_scaling, float sigma_data"


def _linear_map_backward_reference(forward_reference):
    """Reference backward of a map linear in (model_output, sample): its vjp, taken at zero."""

    def backward(grad, timesteps, alphas_cumprod, *args):
        *extra, mask = args
        m = torch.zeros_like(grad, requires_grad=True)
        x = torch.zeros_like(grad, requires_grad=True)
        with torch.enable_grad():
            out = forward_reference(m, x, timesteps, alphas_cumprod, *extra)
            grad_m, grad_x = torch.autograd.grad(out, (m, x), grad, allow_unused=True, materialize_grads=True)
        empty = grad.new_empty(0)
        return (grad_m if mask[0] else empty), (grad_x if mask[1] else empty)

    return backward


_predicted_x0 = lib.define("predicted_x0", f"({_MAP_ARGS}) -> Tensor", ref.predicted_x0, differentiable=True)
_predicted_x0_backward = lib.define(
    "predicted_x0_backward",
    f"({_MAP_BACKWARD_ARGS}, bool[2] output_mask) -> (Tensor, Tensor)",
    _linear_map_backward_reference(ref.predicted_x0),
)
_predicted_eps = lib.define("predicted_eps", f"({_MAP_ARGS}) -> Tensor", ref.predicted_eps, differentiable=True)
_predicted_eps_backward = lib.define(
    "predicted_eps_backward",
    f"({_MAP_BACKWARD_ARGS}, bool[2] output_mask) -> (Tensor, Tensor)",
    _linear_map_backward_reference(ref.predicted_eps),
)
_consistency_output = lib.define(
    "consistency_output", f"({_MAP_ARGS}, {_CONSISTENCY_EXTRA}) -> Tensor", ref.consistency_output, differentiable=True
)
_consistency_output_backward = lib.define(
    "consistency_output_backward",
    f"({_MAP_BACKWARD_ARGS}, {_CONSISTENCY_EXTRA}, bool[2] output_mask) -> (Tensor, Tensor)",
    _linear_map_backward_reference(ref.consistency_output),
)


def _consistency_loss_backward_reference(
    grad_loss,
    grad_model_pred,
    model_output,
    sample,
    timesteps,
    target,
    alphas_cumprod,
    prediction_type,
    loss_type,
    huber_c,
    timestep_scaling,
    sigma_data,
    output_mask,
):
    inputs = [t.detach().requires_grad_() for t in (model_output, sample, target)]
    with torch.enable_grad():
        loss, model_pred = ref.consistency_loss(
            inputs[0],
            inputs[1],
            timesteps,
            inputs[2],
            alphas_cumprod,
            prediction_type,
            loss_type,
            huber_c,
            timestep_scaling,
            sigma_data,
        )
        outputs, grads = [loss], [grad_loss]
        if grad_model_pred is not None:
            outputs.append(model_pred)
            grads.append(grad_model_pred)
        result = torch.autograd.grad(outputs, inputs, grads, allow_unused=True, materialize_grads=True)
    return tuple(g if wanted else model_output.new_empty(0) for g, wanted in zip(result, output_mask))


_consistency_loss = lib.define(
    "consistency_loss",
    "(Tensor model_output, Tensor sample, Tensor timesteps, Tensor target, Tensor alphas_cumprod, "
    "str prediction_type, str loss_type, float huber_c, float timestep_scaling, float sigma_data) -> (Tensor, Tensor)",
    ref.consistency_loss,
    differentiable=True,
)
_consistency_loss_backward = lib.define(
    "consistency_loss_backward",
    "(Tensor grad_loss, Tensor? grad_model_pred, Tensor model_output, Tensor sample, Tensor timesteps, Tensor target, "
    "Tensor alphas_cumprod, str prediction_type, str loss_type, float huber_c, float timestep_scaling, "
    "float sigma_data, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    _consistency_loss_backward_reference,
)

# ---- fake kernels -------------------------------------------------------------------------------


@torch.library.register_fake(lib.qualname("boundary_scalings"))
def _(timesteps, timestep_scaling, sigma_data):
    dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    return (
        torch.empty(timesteps.shape, dtype=dtype, device=timesteps.device),
        torch.empty(timesteps.shape, dtype=dtype, device=timesteps.device),
    )


def _fake_map(model_output, sample, timesteps, alphas_cumprod, prediction_type, *extra):
    return torch.empty_like(model_output)


def _fake_map_backward(grad, timesteps, alphas_cumprod, *args):
    mask = args[-1]
    return tuple(torch.empty_like(grad) if wanted else grad.new_empty(0) for wanted in mask)


for _name in ("predicted_x0", "predicted_eps", "consistency_output"):
    torch.library.register_fake(lib.qualname(_name), _fake_map)
    torch.library.register_fake(lib.qualname(_name + "_backward"), _fake_map_backward)


@torch.library.register_fake(lib.qualname("consistency_loss"))
def _(model_output, sample, timesteps, target, alphas_cumprod, *args):
    dtype = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    return model_output.new_empty((), dtype=dtype), torch.empty_like(model_output)


@torch.library.register_fake(lib.qualname("consistency_loss_backward"))
def _(grad_loss, grad_model_pred, model_output, *args):
    return tuple(torch.empty_like(model_output) if wanted else model_output.new_empty(0) for wanted in args[-1])


# ---- public functions ---------------------------------------------------------------------------


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM boundary scalings (c_skip, c_out) for timesteps of any shape (float32; float64 for float64)."""
    check.tensor("timesteps", timesteps)
    if timesteps.dtype not in check.INDEX_DTYPES + (torch.float32, torch.float64):
        raise TypeError(f"timesteps: expected an integer, float32 or float64 tensor, got {timesteps.dtype}")
    return _boundary_scalings(timesteps, float(timestep_scaling), float(sigma_data))


def _map_arguments(model_output, sample, timesteps, alphas_cumprod, prediction_type, **more_latents):
    check.latents(model_output=model_output, sample=sample, **more_latents)
    check.choice("prediction_type", prediction_type, check.PREDICTION_TYPES)
    timesteps = check.per_sample("timesteps", timesteps, model_output.shape[0], model_output.device, integer=True)
    return model_output, sample, timesteps, check.schedule(alphas_cumprod, model_output.device), prediction_type


def predicted_x0(model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon"):
    """x0 predicted from a model output at (sample, timesteps): docs/design.md §2 parameterisation table."""
    return _predicted_x0(*_map_arguments(model_output, sample, timesteps, alphas_cumprod, prediction_type))


def predicted_eps(model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon"):
    """ε predicted from a model output at (sample, timesteps): docs/design.md §2 parameterisation table."""
    return _predicted_eps(*_map_arguments(model_output, sample, timesteps, alphas_cumprod, prediction_type))


def consistency_output(
    model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon", timestep_scaling=10.0, sigma_data=0.5
):
    """f(m, x, t) = c_skip(t)·x + c_out(t)·x0(m, x, t), differentiable in model_output and sample."""
    args = _map_arguments(model_output, sample, timesteps, alphas_cumprod, prediction_type)
    return _consistency_output(*args, float(timestep_scaling), float(sigma_data))


def consistency_loss(
    model_output,
    sample,
    timesteps,
    target,
    alphas_cumprod,
    prediction_type="epsilon",
    loss_type="huber",
    huber_c=0.001,
    timestep_scaling=10.0,
    sigma_data=0.5,
):
    """Fused distillation loss: model_pred = f(model_output, sample, t); loss = mean ρ(model_pred - target)
    with ρ Huber sqrt(d² + c²) - c or L2 d². Returns (loss, model_pred); both are differentiable
    (model_pred carries the reward term's gradient)."""
    check.choice("loss_type", loss_type, ("huber", "l2"))
    if loss_type == "huber" and not huber_c > 0:
        raise ValueError(f"huber_c: expected a positive constant, got {huber_c}")
    m, x, t, ac, ptype = _map_arguments(model_output, sample, timesteps, alphas_cumprod, prediction_type, target=target)
    return _consistency_loss(
        m, x, t, target, ac, ptype, loss_type, float(huber_c), float(timestep_scaling), float(sigma_data)
    )
