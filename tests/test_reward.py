"""Reward family: the CLIP-style reward head and the latent reward model's pairwise preference loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA_GRAPHS, DEVICES, check_against_reference, device_dtype_params, randn

import rglcd_fast
from rglcd_fast import ops
from rglcd_fast.reference import reward as ref

# The loss variants (kind, real candidate, smooth_gt_label), the real candidate named by its place among the
# K candidates (variant_args gives its index): none, the first, a middle one, the last (the official
# candidates [student prediction, target, real] put it last).
VARIANTS = [
    ("kl", None, False),
    ("ce", None, False),
    ("ce", "first", False),
    ("ce", "middle", False),
    ("ce", "last", False),
    ("kl", "last", True),
    ("kl", "first", True),
]
LOGIT_SCALE = 100.0  # CLIP's trained exp(logit_scale)

# (image_features, text_features): K candidates × B prompts sharing the prompts' text features, odd
# sizes, one prompt for every candidate, and a broadcast in the middle dimension.
HEAD_SHAPES = [
    ((3, 16, 1024), (16, 1024)),
    ((3, 5, 77), (5, 77)),
    ((7, 33), (7, 33)),
    ((2, 4, 3, 9), (3, 9)),
    ((4, 6, 5), (1, 5)),
    ((2, 3, 8), (2, 1, 8)),
    ((5,), (5,)),
]
LOSS_SHAPES = [(3, 16), (2, 5), (4, 7), (3, 1)]


def make_features(image_shape, text_shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = randn(*image_shape, dtype=dtype, device=device, generator=g)
    text = randn(*text_shape, dtype=dtype, device=device, generator=g)
    return image, text, torch.tensor(LOGIT_SCALE, device=device)


def variant_id(variant):
    kind, real, smooth = variant
    return kind + (f"-real_{real}" if real else "") + ("-smooth" if smooth else "")


def variant_args(variant, num_candidates):
    """(kind, real_index, smooth_gt_label) of a variant for K candidates."""
    kind, real, smooth = variant
    real_index = {None: None, "first": 0, "middle": num_candidates // 2, "last": num_candidates - 1}[real]
    return kind, real_index, smooth


def make_logits(shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = randn(*shape, dtype=dtype, device=device, generator=g) * 3
    expert = randn(*shape, dtype=dtype, device=device, generator=g) * 5
    return latent, expert


def test_extension_is_active():
    assert rglcd_fast.has_extension(), rglcd_fast.extension_load_error()
    for name in [
        "reward_head",
        "reward_head_backward",
        "pairwise_preference_loss",
        "pairwise_preference_loss_backward",
    ]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rglcd_fast::{name}", "CPU")


# ---- reward head ------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shapes", HEAD_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}")
def test_reward_head_matches_reference(shapes, device, dtype):
    image, text, scale = make_features(*shapes, device=device, dtype=dtype)
    out = check_against_reference(ops.reward_head, ref.reward_head, (image, text, scale), grad_argnums=(0, 1, 2))
    assert out[0].shape == image.shape[:-1] and out[0].dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_reward_head_float_scale(device):
    image, text, _ = make_features((3, 5, 77), (5, 77), device=device)
    check_against_reference(ops.reward_head, ref.reward_head, (image, text, 14.285), grad_argnums=(0, 1))
    torch.testing.assert_close(
        ops.reward_head(image, text, 14.285),
        ops.reward_head(image, text, torch.tensor(14.285, device=device)),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_reward_head_scale_dtypes_and_shapes(device):
    """A float64 or half scale, a [1] scale: the result keeps the features' dtype, the grad the scale's."""
    image, text, _ = make_features((3, 4, 16), (4, 16), device=device, dtype=torch.bfloat16)
    for scale in [
        torch.tensor(7.5, dtype=torch.float64, device=device),
        torch.tensor([7.5], device=device),
        torch.tensor(7.5, dtype=torch.float16, device=device),
    ]:
        check_against_reference(ops.reward_head, ref.reward_head, (image, text, scale), grad_argnums=(0, 1, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_text", "strided_text"])
def test_reward_head_layouts(layout, device):
    image, text, scale = make_features((3, 6, 40), (6, 40), device=device)
    if layout == "transposed":  # rows in a permuted order, unit-stride features
        image = image.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "strided":  # every other feature of a wider buffer
        wide = torch.zeros(3, 6, 80, device=device)
        wide[..., ::2] = image
        image = wide[..., ::2]
    elif layout == "expanded_text":  # a stride-0 view instead of a broadcast
        text = text.expand(3, 6, 40)
    else:
        text = torch.cat([text, text], dim=-1)[:, 7:47].t().contiguous().t()
    check_against_reference(ops.reward_head, ref.reward_head, (image, text, scale), grad_argnums=(0, 1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_reward_head_empty(device):
    for image_shape, text_shape in [((3, 0, 8), (0, 8)), ((0, 4, 8), (4, 8))]:
        image, text, scale = make_features(image_shape, text_shape, device=device)
        image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()
        scores = ops.reward_head(image, text, scale)
        assert scores.shape == image_shape[:-1]
        grads = torch.autograd.grad(scores.sum(), (image, text, scale))
        assert [g.shape for g in grads] == [image.shape, text.shape, scale.shape]
        assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("device", DEVICES)
def test_reward_head_nan_and_inf_propagate(device):
    image, text, scale = make_features((3, 4, 10), (4, 10), device=device)
    image[0, 1] = 0.0  # a zero vector: NaN, as CLIP's x / x.norm()
    image[1, 2, 3] = float("nan")
    image[2, 0, 5] = float("inf")
    text[3, 1] = float("-inf")
    out = check_against_reference(ops.reward_head, ref.reward_head, (image, text, scale), grad_argnums=(0, 1, 2))
    scores = out[0]
    assert scores[0, 1].isnan() and scores[1, 2].isnan() and scores[2, 0].isnan() and scores[:, 3].isnan().all()
    assert torch.isfinite(scores[0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_reward_head_matches_clip_formula(device):
    """The open_clip form the RG-LCD script uses: (u_hat * v_hat).sum(-1) * logit_scale."""
    image, text, scale = make_features((3, 4, 32), (4, 32), device=device)
    u = image / image.norm(dim=-1, keepdim=True)
    v = text / text.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ops.reward_head(image, text, scale), (u * v).sum(-1) * scale)


# ---- pairwise preference loss -------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
def test_pairwise_loss_matches_reference(shape, variant, device, dtype):
    latent, expert = make_logits(shape, device, dtype)
    loss, accuracy = check_against_reference(
        ops.pairwise_preference_loss,
        ref.pairwise_preference_loss,
        (latent, expert, *variant_args(variant, shape[0])),
        grad_argnums=(0,),
    )
    assert loss.shape == () and accuracy.shape == () and not accuracy.requires_grad
    assert loss.dtype == accuracy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_pairwise_loss_layouts(variant, device):
    latent, expert = make_logits((5, 3), device)
    latent_t = latent.t().contiguous().t()  # column-major [K, B]
    expert_s = torch.stack([expert, expert], dim=-1)[..., 1]  # stride 2
    check_against_reference(
        ops.pairwise_preference_loss,
        ref.pairwise_preference_loss,
        (latent_t, expert_s, *variant_args(variant, 5)),
        grad_argnums=(0,),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_pairwise_loss_empty_batch(variant, device):
    latent, expert = make_logits((3, 0), device)
    latent.requires_grad_()
    args = variant_args(variant, 3)
    loss, accuracy = ops.pairwise_preference_loss(latent, expert, *args)
    ref_loss, ref_accuracy = ref.pairwise_preference_loss(latent, expert, *args)
    assert loss.isnan() and accuracy.isnan() and ref_loss.isnan() and ref_accuracy.isnan()  # means of nothing
    (grad,) = torch.autograd.grad(loss, latent)
    assert grad.shape == latent.shape


def test_pairwise_loss_closed_form():
    """K = 2, one prompt: KL of two Bernoullis; CE against the expert's choice; the grad is (q − p)/B."""
    latent = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([[1.0, 3.0], [0.0, 3.0]], dtype=torch.float64)
    q = torch.sigmoid(latent[0] - latent[1]).detach()
    p = torch.sigmoid(expert[0] - expert[1])
    kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    loss, accuracy = ops.pairwise_preference_loss(latent, expert, "kl")
    torch.testing.assert_close(loss, kl)
    assert accuracy.item() == 0.5  # b = 0: both prefer candidate 0; b = 1: the latent prefers 1, the expert ties → 0
    (grad,) = torch.autograd.grad(loss, latent)
    torch.testing.assert_close(grad, torch.stack([(q - p) / 2, (p - q) / 2]))
    ce, _ = ops.pairwise_preference_loss(latent, expert, "ce")
    torch.testing.assert_close(ce, -q.log().mean())  # the expert's argmax is candidate 0 for both prompts


def test_pairwise_accuracy_ties():
    """argmax ties go to the first index (torch.argmax), in the latent and the expert logits alike."""
    latent = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 3.0], [0.0, 1.0, 3.0]])
    expert = torch.tensor([[2.0, 0.0, 1.0], [2.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    # argmax of pairs (0,1), (0,2), (1,2), latent vs expert, per b:
    # b0: 0,0,0 vs 0,1,1; b1: 1,1,0 vs 0,0,0; b2: 0,0,0 vs 1,1,0: one hit each. CE with the real candidate
    # last labels (0,2), (1,2) 1: b0 0,1,1; b1 0,1,1; b2 1,1,1: 1 + 1 + 0 hits; first: (0,1), (0,2) 0: b0
    # 0,0,1; b1 0,0,0; b2 0,0,0: 2 + 1 + 3 hits. KL's smoothing keeps the expert's labels.
    hits = {
        ("kl", None, False): 3,
        ("ce", None, False): 3,
        ("ce", 2, False): 2,
        ("ce", 0, False): 6,
        ("kl", 2, True): 3,
        ("kl", 0, True): 3,
    }
    for args, count in hits.items():
        _, accuracy = ops.pairwise_preference_loss(latent, expert, *args)
        _, ref_accuracy = ref.pairwise_preference_loss(latent, expert, *args)
        torch.testing.assert_close(accuracy, torch.tensor(count / 9))
        torch.testing.assert_close(ref_accuracy, torch.tensor(count / 9))


# ---- the official script's loss variants (real_index, smooth_gt_label), transcribed by hand --------------

# K = 3 candidates [student prediction, target, real] × B = 4 prompts. The expert's argmax per pair (ties: the
# first), b = 0..3: (0,1) 0,1,0,0 (b = 2 a tie); (0,2) 0,1,1,1; (1,2) 1,0,1,1: the expert prefers a generated
# candidate over the real one at b = 0 of (0,2) and b = 1 of (1,2). The latent argmax: (0,1) 1,1,0,0 (b = 3 a
# tie); (0,2) 0,1,0,1; (1,2) 0,1,1,1.
OFFICIAL_LATENT = [[0.3, -1.0, 2.0, 0.5], [1.2, 0.4, -0.7, 0.5], [-0.2, 1.4, 0.1, 3.0]]
OFFICIAL_EXPERT = [[4.0, -1.0, 0.5, 2.0], [1.0, 3.0, 0.5, -2.0], [2.0, 0.0, 1.0, 9.0]]
PAIRS = [(0, 1), (0, 2), (1, 2)]


def official_batch():
    latent = torch.tensor(OFFICIAL_LATENT, dtype=torch.float64, requires_grad=True)
    return latent, torch.tensor(OFFICIAL_EXPERT, dtype=torch.float64)


def pair(x, i, j):
    """The official script's [B, 2] logits of candidates (i, j)."""
    return torch.stack([x[i], x[j]]).transpose(0, 1)


def test_ce_real_wins_official_formula():
    """kind "ce", real_index 2: the pairs holding the real candidate are labelled 1 (the real wins) whatever the
    expert says, (0, 1) follows the expert's argmax; the loss is Σ F.cross_entropy over the pairs."""
    latent, expert = official_batch()
    labels = {(0, 1): [0, 1, 0, 0], (0, 2): [1, 1, 1, 1], (1, 2): [1, 1, 1, 1]}
    expected = sum(F.cross_entropy(pair(latent, i, j), torch.tensor(y)) for (i, j), y in labels.items())
    loss, accuracy = ops.pairwise_preference_loss(latent, expert, "ce", real_index=2)
    torch.testing.assert_close(loss, expected)
    assert accuracy.item() == pytest.approx(8 / 12)  # the latent argmax hits 3 + 2 + 3 of the labels
    torch.testing.assert_close(torch.autograd.grad(loss, latent)[0], torch.autograd.grad(expected, latent)[0])
    plain, _ = ops.pairwise_preference_loss(latent, expert, "ce")
    assert not torch.isclose(plain, loss)  # the labels of b = 0 of (0,2) and b = 1 of (1,2) changed


def test_smoothed_kl_official_formula():
    """kind "kl", real_index 2, smooth_gt_label: the target of b = 0 of (0,2) and b = 1 of (1,2), where the expert
    prefers the generated candidate, is uniform; every other row stays softmax(E_i, E_j). The accuracy keeps the
    expert's argmax labels (the official code computes them before the smoothing)."""
    latent, expert = official_batch()
    targets = {(i, j): F.softmax(pair(expert, i, j), dim=1) for i, j in PAIRS}
    targets[0, 2][0] = 0.5
    targets[1, 2][1] = 0.5
    expected = sum(
        F.kl_div(F.log_softmax(pair(latent, i, j), dim=1), p, reduction="batchmean") for (i, j), p in targets.items()
    )
    loss, accuracy = ops.pairwise_preference_loss(latent, expert, "kl", real_index=2, smooth_gt_label=True)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, latent)[0], torch.autograd.grad(expected, latent)[0])
    plain, plain_accuracy = ops.pairwise_preference_loss(latent, expert, "kl")
    assert torch.equal(accuracy, plain_accuracy) and not torch.isclose(plain, loss)
    # without smooth_gt_label, real_index leaves KL alone; b = 2, 3 (the expert prefers the real) are unchanged
    assert torch.equal(ops.pairwise_preference_loss(latent, expert, "kl", real_index=2)[0], plain)
    smoothed = ops.pairwise_preference_loss(latent[:, 2:], expert[:, 2:], "kl", real_index=2, smooth_gt_label=True)
    assert torch.equal(smoothed[0], ops.pairwise_preference_loss(latent[:, 2:], expert[:, 2:], "kl")[0])


def test_real_index_ties_go_to_the_first_candidate():
    """With every expert pair tied, a pair without the real candidate is labelled 0 (torch.argmax) next to the
    real-wins labels; the smoothing takes a tie (i, real) for a preference of i, whose uniform target is the
    tie's own softmax."""
    latent = torch.tensor([[0.5, -1.0], [2.0, 0.3], [1.0, 1.5]], dtype=torch.float64)
    expert = torch.ones(3, 2, dtype=torch.float64)
    for real_index, labels in [(2, [0, 1, 1]), (1, [1, 0, 0]), (0, [0, 0, 0])]:
        expected = sum(F.cross_entropy(pair(latent, i, j), torch.full((2,), y)) for (i, j), y in zip(PAIRS, labels))
        hits = sum((pair(latent, i, j).argmax(dim=1) == y).sum().item() for (i, j), y in zip(PAIRS, labels))
        loss, accuracy = ops.pairwise_preference_loss(latent, expert, "ce", real_index=real_index)
        torch.testing.assert_close(loss, expected)
        assert accuracy.item() == pytest.approx(hits / 6)
        smoothed, _ = ops.pairwise_preference_loss(latent, expert, "kl", real_index=real_index, smooth_gt_label=True)
        torch.testing.assert_close(smoothed, ops.pairwise_preference_loss(latent, expert, "kl")[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_pairwise_loss_extreme_logits(variant, device):
    """Far-apart logits (saturated sigmoids) stay finite and match the reference."""
    latent = torch.tensor([[80.0, -80.0, 1e4], [-80.0, 80.0, -1e4], [0.0, 0.0, 0.0]], device=device)
    expert = torch.tensor([[200.0, -200.0, 0.0], [-200.0, 200.0, 1e5], [0.0, 1.0, -1e5]], device=device)
    loss, _ = check_against_reference(
        ops.pairwise_preference_loss,
        ref.pairwise_preference_loss,
        (latent, expert, *variant_args(variant, 3)),
        grad_argnums=(0,),
    )
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_pairwise_loss_nan_and_inf_propagate(variant, device):
    latent, expert = make_logits((3, 6), device)
    latent[1, 0] = float("nan")
    latent[0, 2] = float("inf")
    latent[2, 3] = float("-inf")
    expert[2, 1] = float("nan")
    expert[0, 4] = float("inf")
    expert[1, 5] = float("-inf")
    loss, _ = check_against_reference(
        ops.pairwise_preference_loss,
        ref.pairwise_preference_loss,
        (latent, expert, *variant_args(variant, 3)),
        grad_argnums=(0,),
    )
    assert loss.isnan()


@pytest.mark.parametrize("device", DEVICES)
def test_expert_logits_get_no_gradient(device):
    latent, expert = make_logits((3, 4), device)
    latent.requires_grad_(), expert.requires_grad_()
    loss, _ = ops.pairwise_preference_loss(latent, expert)
    grads = torch.autograd.grad(loss, (latent, expert), allow_unused=True)
    assert grads[0] is not None and (grads[1] is None or not grads[1].any())


def test_deterministic_across_thread_counts():
    threads = torch.get_num_threads()
    image, text, scale = make_features((3, 256, 64), (256, 64))
    latent, expert = make_logits((3, 40000))  # several reduction blocks

    def run():
        u, v, s, x = (t.clone().requires_grad_() for t in (image, text, scale, latent))
        scores = ops.reward_head(u, v, s)
        loss, accuracy = ops.pairwise_preference_loss(x, expert)
        grads = torch.autograd.grad((scores.sum(), loss), (u, v, s, x))
        return (scores, loss, accuracy) + grads

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        multi = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def _cuda_step_ops(image, text, scale, latent, expert, grad_scores, grad_loss):
    """Forward and backward of both ops through the raw ops (no autograd): what a CUDA graph captures."""
    ns = torch.ops.rglcd_fast
    scores = ns.reward_head(image, text, scale)
    grads = ns.reward_head_backward(grad_scores, image, text, scale, [True, True, True])
    loss, accuracy = ns.pairwise_preference_loss(latent, expert, "kl")
    grad_latent = ns.pairwise_preference_loss_backward(grad_loss, latent, expert, "kl")
    return (scores, *grads, loss, accuracy, grad_latent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_bitwise_reproducible(dtype):
    """No float atomics: the same inputs give the same bits, run after run (grad_v with 8 image rows
    per text row, grad_scale over 2048 rows, the loss over several warps of b)."""
    image, text, scale = make_features((8, 256, 1024), (256, 1024), device="cuda", dtype=dtype)
    latent, expert = make_logits((3, 4000), "cuda", dtype)
    g = torch.Generator().manual_seed(1)
    grad_scores = randn(8, 256, dtype=dtype, device="cuda", generator=g)
    grad_loss = torch.tensor(0.7, device="cuda")
    first = _cuda_step_ops(image, text, scale, latent, expert, grad_scores, grad_loss)
    for _ in range(3):
        for a, b in zip(first, _cuda_step_ops(image, text, scale, latent, expert, grad_scores, grad_loss)):
            assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA_GRAPHS, reason="graph capture needs CUDA and its caching allocator")
def test_cuda_graph_capture():
    """No host synchronisation and no host reads: all four ops capture in a CUDA graph, and replaying
    it on new inputs (the scale and the upstream gradient included) matches eager."""
    image, text, scale = make_features((3, 16, 1024), (16, 1024), device="cuda")
    latent, expert = make_logits((3, 16), "cuda")
    grad_scores = torch.randn(3, 16, device="cuda")
    grad_loss = torch.tensor(1.0, device="cuda")
    static = [image, text, scale, latent, expert, grad_scores, grad_loss]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _cuda_step_ops(*static)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _cuda_step_ops(*static)
    new = (
        [torch.randn_like(t) for t in static[:2]]
        + [torch.tensor(42.0, device="cuda")]
        + [torch.randn_like(t) for t in static[3:6]]
        + [torch.tensor(-0.3, device="cuda")]
    )
    for dst, src in zip(static, new):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(outputs, _cuda_step_ops(*new)):
        assert torch.equal(a, b)


# ---- gradcheck, opcheck, compile, bad inputs -----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    image, text, scale = make_features((2, 3, 5), (3, 5), device=device, dtype=torch.float64)
    scale = scale.double()
    inputs = tuple(t.clone().requires_grad_() for t in (image, text, scale))
    assert torch.autograd.gradcheck(ops.reward_head, inputs)
    inputs = tuple(
        t.clone().requires_grad_() for t in make_features((4, 6), (1, 6), device=device, dtype=torch.float64)[:2]
    )
    assert torch.autograd.gradcheck(lambda u, v: ops.reward_head(u, v, 3.0), inputs)
    latent, expert = make_logits((4, 5), device=device, dtype=torch.float64)
    for variant in VARIANTS:
        args = variant_args(variant, 4)
        assert torch.autograd.gradcheck(
            lambda s: ops.pairwise_preference_loss(s, expert, *args), (latent.clone().requires_grad_(),)
        )


def _opcheck_samples(device="cpu"):
    image, text, scale = make_features((3, 4, 16), (4, 16), device=device)
    image_g, text_g, scale_g = (t.clone().requires_grad_() for t in (image, text, scale))
    grad = torch.randn(3, 4).to(device)
    ns = torch.ops.rglcd_fast
    yield ns.reward_head.default, (image_g, text_g, scale_g)
    yield ns.reward_head.default, (image.transpose(0, 1), text_g[:, None], scale)
    yield ns.reward_head_backward.default, (grad, image, text, scale, [True, True, True])
    yield ns.reward_head_backward.default, (grad, image, text, scale, [False, True, False])
    latent, expert = make_logits((3, 5), device)
    for variant in VARIANTS:
        args = variant_args(variant, 3)
        yield ns.pairwise_preference_loss.default, (latent.clone().requires_grad_(), expert, *args)
        yield ns.pairwise_preference_loss_backward.default, (torch.tensor(0.7, device=device), latent, expert, *args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(range(len(list(_opcheck_samples())))))
def test_opcheck(sample, device):
    op, args = list(_opcheck_samples(device))[sample]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_compile_fullgraph_matches_eager(variant):
    """The LRM update of §1 step 9: latent logits from the reward head, then the pairwise loss."""
    image, text, scale = make_features((3, 4, 32), (4, 32))
    expert = make_logits((3, 4))[1]
    kind, real_index, smooth_gt_label = variant_args(variant, 3)

    def step(image, text, scale, expert):
        logits = ops.reward_head(image, text, scale)
        loss, accuracy = ops.pairwise_preference_loss(
            logits, expert, kind, real_index=real_index, smooth_gt_label=smooth_gt_label
        )
        return loss, accuracy

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (image, text, scale)]
        loss, accuracy = fn(*inputs, expert)
        return (loss, accuracy) + torch.autograd.grad(loss, inputs)

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_compile_float_scale_traces():
    """A Python-float logit_scale becomes a filled tensor inside the graph (no graph break, no host copy)."""
    image, text, _ = make_features((3, 4, 32), (4, 32))

    def head(image, text):
        return ops.reward_head(image, text, 50.0)

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(image, text), head(image, text))


def test_bad_inputs_name_the_argument():
    image, text, scale = make_features((3, 4, 8), (4, 8))
    latent, expert = make_logits((3, 4))
    cases = [
        (TypeError, "image_features", lambda: ops.reward_head(image.long(), text, scale)),
        (TypeError, "image_features", lambda: ops.reward_head(image.numpy(), text, scale)),
        (TypeError, "text_features", lambda: ops.reward_head(image, text.double(), scale)),
        (ValueError, "text_features", lambda: ops.reward_head(image, text[:, :5], scale)),
        (ValueError, "text_features", lambda: ops.reward_head(image, text[:3], scale)),
        (ValueError, "text_features", lambda: ops.reward_head(image[0], text.expand(3, 4, 8), scale)),
        (ValueError, "image_features", lambda: ops.reward_head(image[..., :0], text[..., :0], scale)),
        (ValueError, "image_features", lambda: ops.reward_head(image[0, 0, 0], text, scale)),
        (ValueError, "logit_scale", lambda: ops.reward_head(image, text, torch.ones(2))),
        (TypeError, "logit_scale", lambda: ops.reward_head(image, text, torch.tensor(3))),
        (TypeError, "logit_scale", lambda: ops.reward_head(image, text, "100")),
        (ValueError, "logits", lambda: ops.pairwise_preference_loss(latent[:1], expert[:1])),
        (ValueError, "logits", lambda: ops.pairwise_preference_loss(latent[0], expert[0])),
        (ValueError, "logits", lambda: ops.pairwise_preference_loss(latent[None], expert[None])),
        (ValueError, "expert_logits", lambda: ops.pairwise_preference_loss(latent, expert[:2])),
        (TypeError, "expert_logits", lambda: ops.pairwise_preference_loss(latent, expert.half())),
        (TypeError, "logits", lambda: ops.pairwise_preference_loss(latent.long(), expert.long())),
        (TypeError, "expert_logits", lambda: ops.pairwise_preference_loss(latent, [1.0])),
        (ValueError, "kind", lambda: ops.pairwise_preference_loss(latent, expert, "bce")),
        (TypeError, "real_index", lambda: ops.pairwise_preference_loss(latent, expert, "ce", real_index=True)),
        (TypeError, "real_index", lambda: ops.pairwise_preference_loss(latent, expert, "ce", real_index=2.0)),
        (TypeError, "smooth_gt_label", lambda: ops.pairwise_preference_loss(latent, expert, "kl", 2, "yes")),
    ]
    if torch.cuda.is_available():
        cases.append((ValueError, "text_features", lambda: ops.reward_head(image, text.cuda(), scale)))
        cases.append((ValueError, "logit_scale", lambda: ops.reward_head(image, text, scale.cuda())))
        cases.append((ValueError, "expert_logits", lambda: ops.pairwise_preference_loss(latent, expert.cuda())))
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
    assert math.isfinite(ops.reward_head(image, text, 1).sum().item())  # an int scale is a float


# (kind, real_index, smooth_gt_label) for K = 3 and the message the error must carry
BAD_RULES = [
    ("ce", 3, False, r"real_index.*\[0, 3\)"),
    ("kl", -1, False, r"real_index.*\[0, 3\)"),
    ("ce", 2, True, "smooth_gt_label.*'kl'"),
    ("kl", None, True, "smooth_gt_label.*real_index"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", BAD_RULES, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
def test_bad_preference_rule(rule, device):
    """A ValueError naming the argument from the public function, the reference and both ops called directly."""
    *args, message = rule
    latent, expert = make_logits((3, 4), device)
    ns = torch.ops.rglcd_fast
    calls = [
        lambda: ops.pairwise_preference_loss(latent, expert, *args),
        lambda: ref.pairwise_preference_loss(latent, expert, *args),
        lambda: ns.pairwise_preference_loss(latent, expert, *args),
        lambda: ns.pairwise_preference_loss_backward(torch.tensor(1.0, device=device), latent, expert, *args),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
