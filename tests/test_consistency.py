"""Consistency family: boundary scalings, predicted x0 / ε, consistency output, distillation loss."""

import pytest
import torch
from helpers import LAYOUTS, check_against_reference, device_dtype_params, in_layout, randn, sd_alphas_cumprod

import rglcd_fast
from rglcd_fast import ops
from rglcd_fast.reference import consistency as ref

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
MAPS = ["predicted_x0", "predicted_eps", "consistency_output"]
SHAPE = (3, 4, 9, 7)  # odd sizes


def make_inputs(device, dtype, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, x, y = (randn(*shape, dtype=dtype, device=device, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    if shape[0] > 1:
        t[0], t[-1] = 0, 999  # the boundary (c_out = 0, c_skip = 1) and the end of the schedule
    return m, x, t, y, sd_alphas_cumprod(device)


def test_extension_is_active():
    assert rglcd_fast.has_extension(), rglcd_fast.extension_load_error()
    for name in ["boundary_scalings", *MAPS, "consistency_loss"]:
        assert hasattr(torch.ops.rglcd_fast, name)


@pytest.mark.parametrize(
    "timesteps",
    [torch.tensor([0, 1, 19, 499, 999]), torch.tensor(259), torch.tensor([0.0, 0.5, 999.0], dtype=torch.float64)],
)
def test_boundary_scalings(timesteps):
    c_skip, c_out = ops.boundary_scalings(timesteps, 10.0, 0.5)
    r_skip, r_out = ref.boundary_scalings(timesteps, 10.0, 0.5)
    assert c_skip.dtype == r_skip.dtype and c_skip.shape == timesteps.shape
    torch.testing.assert_close(c_skip, r_skip, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_out, r_out, rtol=1e-6, atol=0)
    if timesteps.dim() and timesteps[0] == 0:
        assert c_skip[0] == 1 and c_out[0] == 0


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", MAPS)
def test_map_matches_reference(name, prediction_type, device, dtype):
    m, x, t, _, ac = make_inputs(device, dtype)
    check_against_reference(getattr(ops, name), getattr(ref, name), (m, x, t, ac, prediction_type), grad_argnums=(0, 1))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("loss_type", ["huber", "l2"])
def test_loss_matches_reference(loss_type, prediction_type, device, dtype):
    m, x, t, y, ac = make_inputs(device, dtype)
    args = (m, x, t, y, ac, prediction_type, loss_type, 0.001)
    # Gradients reach model_output, sample and target, through the loss and through model_pred.
    check_against_reference(ops.consistency_loss, ref.consistency_loss, args, grad_argnums=(0, 1, 3))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, device):
    m, x, t, y, ac = make_inputs(device, torch.float32)
    ml, xl, yl = (in_layout(v, layout) for v in (m, x, y))
    out = check_against_reference(
        ops.consistency_loss, ref.consistency_loss, (ml, xl, t, yl, ac, "v_prediction"), grad_argnums=(0, 1, 3)
    )
    assert out[1].stride() == torch.empty_like(ml).stride()
    check_against_reference(ops.consistency_output, ref.consistency_output, (ml, x, t, ac), grad_argnums=(0, 1))


@pytest.mark.parametrize("timesteps", [torch.tensor(250), torch.tensor([250])])
def test_broadcast_timestep(timesteps):
    m, x, _, y, ac = make_inputs("cpu", torch.float32)
    full = timesteps.reshape(1).expand(m.shape[0])
    for name in MAPS:
        torch.testing.assert_close(
            getattr(ops, name)(m, x, timesteps, ac), getattr(ops, name)(m, x, full, ac), rtol=0, atol=0
        )
    torch.testing.assert_close(
        ops.consistency_loss(m, x, timesteps, y, ac), ops.consistency_loss(m, x, full, y, ac), rtol=0, atol=0
    )


def test_other_ranks():
    """Batch-first tensors of any rank: [B, N] tokens, [B, C, F, H, W] video latents."""
    ac = sd_alphas_cumprod()
    for shape in [(5, 33), (2, 4, 3, 5, 6)]:
        m, x, y = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        t = torch.randint(0, 1000, (shape[0],))
        check_against_reference(ops.consistency_loss, ref.consistency_loss, (m, x, t, y, ac), grad_argnums=(0, 1, 3))


def test_empty_batch():
    m, x, t, y, ac = make_inputs("cpu", torch.float32, shape=(0, 4, 5, 5))
    assert ops.consistency_output(m, x, t, ac).shape == m.shape
    loss, pred = ops.consistency_loss(m.requires_grad_(), x, t, y, ac)
    assert pred.shape == m.shape and torch.isnan(loss)  # the mean of nothing, as torch.mean
    (grad,) = torch.autograd.grad(loss, m)
    assert grad.shape == m.shape


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_gradcheck_float64(prediction_type):
    m, x, t, y, ac = make_inputs("cpu", torch.float64, shape=(2, 3, 4, 5))
    t = torch.tensor([3, 800])  # away from t = 0 keeps Huber's curvature moderate for finite differences
    m, x, y = (v.requires_grad_() for v in (m, x, y))
    for name in MAPS:
        op = getattr(ops, name)
        assert torch.autograd.gradcheck(lambda a, b: op(a, b, t, ac, prediction_type), (m, x))
    for loss_type in ["huber", "l2"]:
        assert torch.autograd.gradcheck(
            lambda a, b, c: ops.consistency_loss(a, b, t, c, ac, prediction_type, loss_type, 0.1), (m, x, y)
        )


def _opcheck_samples():
    m, x, t, y, ac = make_inputs("cpu", torch.float32, shape=(2, 3, 4, 5))
    mg = m.clone().requires_grad_()
    ops_ns = torch.ops.rglcd_fast
    yield ops_ns.boundary_scalings.default, (t, 10.0, 0.5)
    for name in ["predicted_x0", "predicted_eps"]:
        for pt in PREDICTION_TYPES:
            yield getattr(ops_ns, name).default, (mg, x, t, ac, pt)
            yield getattr(ops_ns, name + "_backward").default, (m, t, ac, pt, [True, True])
    yield ops_ns.consistency_output.default, (mg, x, t, ac, "epsilon", 10.0, 0.5)
    yield ops_ns.consistency_output_backward.default, (m, t, ac, "epsilon", 10.0, 0.5, [True, False])
    yield ops_ns.consistency_loss.default, (mg, x, t, y, ac, "v_prediction", "huber", 0.001, 10.0, 0.5)
    yield (
        ops_ns.consistency_loss_backward.default,
        (torch.tensor(1.0), m, m, x, t, y, ac, "epsilon", "l2", 0.001, 10.0, 0.5, [True, True, True]),
    )
    yield (
        ops_ns.consistency_loss_backward.default,
        (torch.tensor(1.0), None, m, x, t, y, ac, "epsilon", "huber", 0.001, 10.0, 0.5, [True, False, False]),
    )


@pytest.mark.parametrize("sample", list(range(len(list(_opcheck_samples())))))
def test_opcheck(sample):
    op, args = list(_opcheck_samples())[sample]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    m, x, t, y, ac = make_inputs("cpu", torch.float32)

    def step(m, x, t, y, ac):
        loss, pred = ops.consistency_loss(m, x, t, y, ac, "epsilon")
        return loss + 0.1 * pred.square().mean(), ops.predicted_eps(m, x, t, ac, "v_prediction")

    mg = m.clone().requires_grad_()
    eager = step(mg, x, t, y, ac)
    (eager_grad,) = torch.autograd.grad(eager[0], mg)
    mc = m.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True)(mc, x, t, y, ac)
    (compiled_grad,) = torch.autograd.grad(compiled[0], mc)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_nan_and_inf_propagate():
    m, x, t, y, ac = make_inputs("cpu", torch.float32)
    m[1, 2, 3, 4] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    for name in MAPS:
        for pt in PREDICTION_TYPES:
            check_against_reference(getattr(ops, name), getattr(ref, name), (m, x, t, ac, pt))
    loss, _ = ops.consistency_loss(m, x, t, y, ac)
    assert torch.isnan(loss)


def test_bad_inputs_name_the_argument():
    m, x, t, y, ac = make_inputs("cpu", torch.float32)
    cases = [
        (TypeError, "sample", lambda: ops.consistency_output(m, x.half(), t, ac)),
        (ValueError, "sample", lambda: ops.consistency_output(m, x[:, :2], t, ac)),
        (ValueError, "target", lambda: ops.consistency_loss(m, x, t, y[:2], ac)),
        (TypeError, "model_output", lambda: ops.predicted_x0(m.long(), x, t, ac)),
        (TypeError, "timesteps", lambda: ops.predicted_x0(m, x, t.float(), ac)),
        (ValueError, "timesteps", lambda: ops.predicted_x0(m, x, t[:2], ac)),
        (ValueError, "timesteps", lambda: ops.predicted_x0(m, x, t + 1000, ac)),
        (ValueError, "timesteps", lambda: ops.consistency_loss(m, x, t - 1000, y, ac)),
        (ValueError, "prediction_type", lambda: ops.predicted_eps(m, x, t, ac, "flow")),
        (ValueError, "loss_type", lambda: ops.consistency_loss(m, x, t, y, ac, loss_type="l1")),
        (ValueError, "huber_c", lambda: ops.consistency_loss(m, x, t, y, ac, huber_c=0.0)),
        (TypeError, "alphas_cumprod", lambda: ops.predicted_x0(m, x, t, ac.half())),
        (ValueError, "alphas_cumprod", lambda: ops.predicted_x0(m, x, t, ac[None])),
        (TypeError, "sample", lambda: ops.predicted_x0(m, x.numpy(), t, ac)),
        (ValueError, "model_output", lambda: ops.predicted_x0(m[0, 0, 0, 0], x[0, 0, 0, 0], t[:1], ac)),
    ]
    if torch.cuda.is_available():
        cases.append((ValueError, "sample", lambda: ops.consistency_output(m, x.cuda(), t, ac)))
        cases.append((ValueError, "timesteps", lambda: ops.consistency_output(m.cuda(), x.cuda(), t, ac.cuda())))
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
