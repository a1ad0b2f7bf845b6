"""Property-based tests (hypothesis) over every public op: random shapes (0, 1, odd and prime sizes),
dtypes, layouts (contiguous, channels_last, strided, batch-inner), per-sample or broadcast (0-d tensor)
timesteps, per-sample or scalar guidance and logit scales, NaN, ±inf and huge values, against the
references with the tolerance rule of tests/helpers.py (forward, and backward where the op is
differentiable); and random bad inputs, which must raise a TypeError or ValueError naming the argument, never
crash. Seeded (derandomize): the same cases
every run. RGLCD_FUZZ_EXAMPLES sets the cases per test (default 300; 8 tests); RGLCD_FUZZ_DEVICE=cuda runs them on
the GPU kernels."""

import os

import pytest
import torch
from helpers import LAYOUTS, check_against_reference, in_layout, sd_alphas_cumprod
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rglcd_fast import ops
from rglcd_fast.reference import consistency as ref_consistency
from rglcd_fast.reference import reward as ref_reward
from rglcd_fast.reference import solver as ref_solver

FUZZ = settings(
    max_examples=int(os.environ.get("RGLCD_FUZZ_EXAMPLES", "300")),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
# RGLCD_FUZZ_DEVICE=cuda: the same cases on the GPU kernels
DEVICE = torch.device(os.environ.get("RGLCD_FUZZ_DEVICE", "cpu"))
AC = sd_alphas_cumprod().to(DEVICE)


@st.composite
def latents(draw, count):
    """count tensors [B, C, H, W] of one dtype, each in a drawn layout, with NaN / huge values sometimes;
    the batch size and a generator for the per-sample arguments."""
    batch = draw(st.sampled_from([0, 1, 2, 3, 5, 7]))
    shape = (
        batch,
        draw(st.sampled_from([1, 3, 4])),
        draw(st.sampled_from([1, 2, 3, 5, 7])),
        draw(st.sampled_from([1, 2, 5, 8])),
    )
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors = []
    for _ in range(count):
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        # NaN and ±inf must come out where the reference's do (inf - inf is NaN there too: the kernels keep
        # diffusers' operation order); 1e4 overflows float16 on the way and cancels at high noise.
        special = draw(st.sampled_from([None, None, None, float("nan"), 1e4, float("inf"), -float("inf")]))
        if special is not None and t.numel():
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = special
        tensors.append(in_layout(t.to(DEVICE, dtype), draw(st.sampled_from(LAYOUTS))))
    return batch, tensors, generator


@st.composite
def timesteps(draw, batch, generator, low=0):
    """Per-sample [B] int64 or int32, or one value for all (a 0-d tensor, broadcast)."""
    form = draw(st.sampled_from(["per_sample", "per_sample_int32", "0-d"]))
    if form == "0-d":
        return torch.tensor(draw(st.integers(low, 999)), device=DEVICE)
    t = torch.randint(low, 1000, (batch,), generator=generator).to(DEVICE)
    return t.int() if form == "per_sample_int32" else t


def previous(t, by=20):
    return (t - by).clamp(min=0)


@FUZZ
@given(
    data=st.data(),
    name=st.sampled_from(["predicted_x0", "predicted_eps", "consistency_output"]),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
)
def test_parameterisation_maps(data, name, prediction_type):
    batch, (m, x), g = data.draw(
        latents(
            2,
        )
    )
    t = data.draw(timesteps(batch, g))
    check_against_reference(
        getattr(ops, name), getattr(ref_consistency, name), (m, x, t, AC, prediction_type), grad_argnums=(0, 1)
    )


@FUZZ
@given(
    data=st.data(),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    loss_type=st.sampled_from(["huber", "l2"]),
    huber_c=st.sampled_from([0.001, 0.1, 1.0]),
)
def test_consistency_loss(data, prediction_type, loss_type, huber_c):
    batch, (m, x, y), g = data.draw(
        latents(
            3,
        )
    )
    t = data.draw(timesteps(batch, g))
    check_against_reference(
        ops.consistency_loss,
        ref_consistency.consistency_loss,
        (m, x, t, y, AC, prediction_type, loss_type, huber_c),
        grad_argnums=(0, 1, 3),
    )


@FUZZ
@given(data=st.data(), prediction_type=st.sampled_from(PREDICTION_TYPES))
def test_guided_ddim_step(data, prediction_type):
    batch, (c, u, x), g = data.draw(
        latents(
            3,
        )
    )
    t = data.draw(timesteps(batch, g))
    w = data.draw(st.sampled_from(["per_sample", "float"]))
    w = (1.0 + 10 * torch.rand(batch, generator=g)).to(DEVICE) if w == "per_sample" else 7.5
    check_against_reference(
        ops.guided_ddim_step,
        ref_solver.guided_ddim_step,
        (c, u, x, t, previous(t), w, AC, prediction_type),
        grad_argnums=(0, 1, 2),
    )


X0_LIMITS = [
    dict(),
    dict(clip_sample=True, clip_sample_range=1.5),
    dict(clip_sample=True, clip_sample_range=-0.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
    dict(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=0.5),
]


def limit_args(limit):
    kw = {
        **dict(
            clip_sample=False,
            clip_sample_range=1.0,
            thresholding=False,
            dynamic_thresholding_ratio=0.995,
            sample_max_value=1.0,
        ),
        **limit,
    }
    return (
        kw["clip_sample"],
        kw["clip_sample_range"],
        kw["thresholding"],
        kw["dynamic_thresholding_ratio"],
        kw["sample_max_value"],
    )


@FUZZ
@given(
    data=st.data(),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    limit=st.sampled_from(X0_LIMITS),
    last=st.booleans(),
    final=st.sampled_from([1.0, 0.9991]),
)
def test_lcm_step(data, prediction_type, limit, last, final):
    batch, (m, x, z), g = data.draw(latents(3))
    t = data.draw(timesteps(batch, g))
    check_against_reference(
        ops.lcm_step,
        ref_solver.lcm_step,
        (m, x, t, previous(t, 250), AC, None if last else z, final, prediction_type, 10.0, *limit_args(limit)),
    )


@FUZZ
@given(
    data=st.data(),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    limit=st.sampled_from(X0_LIMITS),
    eta=st.sampled_from([0.0, 0.5, 1.0, -0.3]),
    use_clipped=st.booleans(),
)
def test_ddim_step(data, prediction_type, limit, eta, use_clipped):
    batch, (m, x, z), g = data.draw(latents(3))
    t = data.draw(timesteps(batch, g))
    prev = t - 100  # negative where t < 100: the final ᾱ
    check_against_reference(
        ops.ddim_step,
        ref_solver.ddim_step,
        (m, x, t, prev, AC, z if eta > 0 else None, 1.0, eta, prediction_type, *limit_args(limit), use_clipped),
    )


@FUZZ
@given(
    data=st.data(),
    dim=st.sampled_from([1, 2, 3, 7, 16, 31]),
    candidates=st.sampled_from([1, 2, 3]),
    batch=st.sampled_from([0, 1, 2, 5]),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from(["tensor", "0-d", "float"]),
    text_broadcast=st.booleans(),
)
def test_reward_head(data, dim, candidates, batch, dtype, scale, text_broadcast):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    image = torch.randn(candidates, batch, dim, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    text = torch.randn(batch if text_broadcast else 1, dim, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    if not text_broadcast:
        text = text.expand(batch, dim)  # a stride-0 view
    value = {"tensor": torch.tensor([14.3], device=DEVICE), "0-d": torch.tensor(14.3, device=DEVICE), "float": 14.3}[
        scale
    ]
    check_against_reference(
        ops.reward_head,
        ref_reward.reward_head,
        (image, text, value),
        grad_argnums=(0, 1, 2) if scale != "float" else (0, 1),
    )


@FUZZ
@given(
    data=st.data(),
    candidates=st.sampled_from([2, 3, 4]),
    batch=st.sampled_from([1, 2, 3, 7]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["kl", "ce"]),
    smooth=st.booleans(),
    with_real=st.booleans(),
    transposed=st.booleans(),
)
def test_pairwise_preference_loss(data, candidates, batch, dtype, kind, smooth, with_real, transposed):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    logits = (3 * torch.randn(candidates, batch, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    expert = (3 * torch.randn(candidates, batch, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    if transposed:
        logits = logits.t().contiguous().t()
    real_index = data.draw(st.integers(0, candidates - 1)) if with_real or kind == "ce" else None
    smooth = smooth and kind == "kl" and real_index is not None
    check_against_reference(
        ops.pairwise_preference_loss,
        ref_reward.pairwise_preference_loss,
        (logits, expert, kind, real_index, smooth),
        grad_argnums=(0,),
    )


# ---- bad inputs: a named TypeError / ValueError, never a crash ------------------------------------
def _valid_call(op):
    # on the CPU: a CUDA kernel cannot raise for an out-of-range timestep without a host sync (it writes NaN)
    ac = AC.cpu()
    m, x = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t, prev = torch.tensor([500, 20]), torch.tensor([480, 0])
    calls = {
        "predicted_x0": lambda **o: ops.predicted_x0(
            o.get("model_output", m), o.get("sample", x), o.get("timesteps", t), ac, o.get("prediction_type", "epsilon")
        ),
        "consistency_loss": lambda **o: ops.consistency_loss(
            o.get("model_output", m),
            o.get("sample", x),
            o.get("timesteps", t),
            o.get("target", x),
            ac,
            o.get("prediction_type", "epsilon"),
        ),
        "guided_ddim_step": lambda **o: ops.guided_ddim_step(
            o.get("model_output", m),
            m,
            o.get("sample", x),
            o.get("timesteps", t),
            o.get("prev_timesteps", prev),
            7.5,
            ac,
            o.get("prediction_type", "epsilon"),
        ),
        "lcm_step": lambda **o: ops.lcm_step(
            o.get("model_output", m),
            o.get("sample", x),
            o.get("timesteps", t),
            o.get("prev_timesteps", prev),
            ac,
            prediction_type=o.get("prediction_type", "epsilon"),
        ),
        "ddim_step": lambda **o: ops.ddim_step(
            o.get("model_output", m),
            o.get("sample", x),
            o.get("timesteps", t),
            o.get("prev_timesteps", prev),
            ac,
            prediction_type=o.get("prediction_type", "epsilon"),
        ),
    }
    return calls[op]


# corruption -> (argument it names, the value)
CORRUPTIONS = {
    "int model_output": ("model_output", lambda: torch.ones(2, 4, 3, 3, dtype=torch.int32)),
    "model_output of another shape": ("model_output", lambda: torch.randn(2, 4, 3, 2)),
    "sample of another batch": ("sample", lambda: torch.randn(3, 4, 3, 3)),
    "float timesteps": ("timesteps", lambda: torch.tensor([500.0, 20.0])),
    "timesteps past the schedule": ("timesteps", lambda: torch.tensor([1000, 20])),
    "negative timesteps": ("timesteps", lambda: torch.tensor([-1, 20])),
    "timesteps for another batch": ("timesteps", lambda: torch.tensor([500, 20, 10])),
    "unknown prediction type": ("prediction_type", lambda: "flow"),
    "prediction type not a string": ("prediction_type", lambda: 3),
}


@FUZZ
@given(
    op=st.sampled_from(["predicted_x0", "consistency_loss", "guided_ddim_step", "lcm_step", "ddim_step"]),
    corruption=st.sampled_from(list(CORRUPTIONS)),
)
def test_bad_inputs_raise_naming_the_argument(op, corruption):
    name, make = CORRUPTIONS[corruption]
    named = "cond_output" if (op, name) == ("guided_ddim_step", "model_output") else name
    with pytest.raises((TypeError, ValueError), match=rf"(?<!\w){named}\b"):
        _valid_call(op)(**{name: make()})
