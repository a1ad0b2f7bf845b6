"""One RG-LCD step on the fused ops equals a straight eager implementation of docs/design.md §1 (the LCD
script's code: unfused helpers, two teacher passes) on the same inputs and draws."""

import copy

import lcd_script
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import SD_SCHEDULE
from tiny_pipeline import tiny_unet

from rglcd_fast.train import DistillationConfig, DistillationStep, update_ema


def assert_step_equals_the_script(with_reward, xl=False, prediction_type="epsilon"):
    """Our step against the script's eager math on the same tiny models, inputs and draws (xl: an SDXL UNet
    with its added conditions)."""
    torch.manual_seed(0)
    teacher = tiny_unet(time_cond_proj_dim=None, xl=xl).eval()
    student = tiny_unet(time_cond_proj_dim=8, xl=xl)
    student.load_state_dict(teacher.state_dict(), strict=False)  # initialised from the teacher
    target_unet = copy.deepcopy(student).eval()
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    config = DistillationConfig(reward_scale=0.5)
    width = teacher.config.cross_attention_dim
    latents, embeds = torch.randn(3, 4, 8, 8), torch.randn(3, 5, width)
    added = dict(text_embeds=torch.randn(3, 8), time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3))
    # SD: the script's empty-prompt embeddings; SDXL: zero embeddings, as its scripts
    uncond = torch.zeros_like(embeds) if xl else torch.randn(3, 5, width)
    reward_weights = torch.randn(4, 8, 8)
    reward_fn = (lambda z: (z * reward_weights).flatten(1).mean(1)) if with_reward else None
    sdxl = (
        dict(added_cond_kwargs=added, uncond_added_cond_kwargs=dict(added, text_embeds=torch.zeros(3, 8))) if xl else {}
    )

    step = DistillationStep(scheduler, config)
    out = step(
        student, teacher, target_unet, latents, embeds, uncond, reward_fn, torch.Generator().manual_seed(7), **sdxl
    )
    ours = torch.autograd.grad(out.loss, list(student.parameters()))
    solver = lcd_script.DDIMSolver(scheduler.alphas_cumprod.numpy(), 1000, config.num_ddim_timesteps)
    loss, model_pred, target = lcd_script.lcd_step(
        student,
        teacher,
        target_unet,
        latents,
        embeds,
        uncond,
        scheduler,
        solver,
        config,
        torch.Generator().manual_seed(7),
        reward_fn,
        added if xl else None,
    )
    theirs = torch.autograd.grad(loss, list(student.parameters()))
    # the exact gradients: the script's math in float64 on the same inputs and draws (drawn in float32)
    models64 = [copy.deepcopy(m).double() for m in (student, teacher, target_unet)]
    loss64, _, _ = lcd_script.lcd_step(
        *models64,
        latents.double(),
        embeds.double(),
        uncond.double(),
        scheduler,
        solver,
        config,
        torch.Generator().manual_seed(7),
        reward_fn,
        {k: v.double() for k, v in added.items()} if xl else None,
    )
    exact = torch.autograd.grad(loss64, list(models64[0].parameters()))
    # the script's x_prev is float64 (its numpy ᾱ_prev table), as ours: float32-level agreement
    torch.testing.assert_close(out.target, target.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.model_pred, model_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
    assert (out.reward_loss is not None) == with_reward
    # Huber's derivative d/sqrt(d² + c²) with c = 0.001 turns float32 rounding of d (~1e-7 of |d| ~ 0.1) into
    # relative changes of ~1e-4 near d = 0, the script's own as much (measured up to 4e-4 between the two, on
    # an AMD EPYC's kernels): each parameter's gradient, as a whole, off the exact (float64) one by at most
    # twice the script's float32 error, or that 1e-4 of its size
    for name, a, b, e in zip(dict(student.named_parameters()), ours, theirs, exact):
        ours_error, script_error = (a.double() - e).norm(), (b.double() - e).norm()
        assert ours_error <= 2 * script_error + 1e-4 * e.norm() + 1e-9, (name, ours_error, script_error)


@pytest.mark.parametrize("with_reward", [False, True])
def test_step_equals_the_eager_lcd_math(with_reward):
    assert_step_equals_the_script(with_reward)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_step_equals_the_sdxl_script_math(prediction_type):
    """SDXL: pooled text embeddings and size / crop ids through added_cond_kwargs to the teacher (both
    branches), the student and the target; the unconditional branch as the SDXL scripts build it."""
    assert_step_equals_the_script(with_reward=True, xl=True, prediction_type=prediction_type)


def test_sdxl_conditions_come_in_pairs():
    step = DistillationStep(DDPMScheduler(**SD_SCHEDULE), DistillationConfig())
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="uncond_added_cond_kwargs: required"):
        step(None, None, None, x, x, x, added_cond_kwargs={"text_embeds": x, "time_ids": x})


def test_config_errors():
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        DistillationStep(DDPMScheduler(**SD_SCHEDULE), DistillationConfig(num_ddim_timesteps=48))


def test_ema_update():
    torch.manual_seed(0)
    student, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.95 * t.detach() + 0.05 * s.detach() for t, s in zip(target.parameters(), student.parameters())]
    update_ema(target, student, 0.95)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t.detach(), e)
    update_ema(target, student, 0.0)  # decay 0: a copy
    for t, s in zip(target.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    with pytest.raises(ValueError, match="decay"):
        update_ema(target, student, 1.5)
    with pytest.raises(ValueError, match="target"):
        update_ema(torch.nn.Linear(4, 2), student)


@pytest.mark.parametrize("with_reward", [False, True])
def test_lora_on_the_teacher_unet_is_the_two_unet_step(with_reward):
    """LCM-LoRA with one UNet (the adapters on the teacher's UNet, the teacher passes with them off) is the
    step of a LoRA copy of the teacher beside the teacher, bit for bit: loss and adapter gradients."""
    from peft import LoraConfig

    from rglcd_fast.train.models import LORA_TARGET_MODULES, WithoutAdapters, add_lora

    torch.manual_seed(0)
    teacher = tiny_unet(time_cond_proj_dim=None).eval().requires_grad_(False)
    one_unet = copy.deepcopy(teacher)
    torch.manual_seed(1)  # the adapters' initial weights
    two_unet_student = copy.deepcopy(teacher)
    two_unet_student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGET_MODULES))
    two_unet_student.train()
    torch.manual_seed(1)
    student = add_lora(one_unet, 4, 4)
    assert student is one_unet
    for module in (two_unet_student, student):  # LoRA-B starts at zero: move it so the adapters matter
        lora_b = [p for name, p in module.named_parameters() if "lora_B" in name]
        for i, p in enumerate(lora_b):
            torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(i))
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    latents, embeds, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    reward_weights = torch.randn(4, 8, 8)
    reward_fn = (lambda z: (z * reward_weights).flatten(1).mean(1)) if with_reward else None
    step = DistillationStep(scheduler, DistillationConfig(reward_scale=0.5))

    def run(student, teacher):
        out = step(student, teacher, student, latents, embeds, uncond, reward_fn, torch.Generator().manual_seed(7))
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.loss, [p for p in student.parameters() if p.requires_grad])
        return out.loss, dict(zip(names, grads))

    loss, grads = run(student, WithoutAdapters(student))
    expected_loss, expected_grads = run(two_unet_student, teacher)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and all("lora" in name for name in grads)
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name
    assert all(p.dtype == torch.float32 for p in student.parameters() if p.requires_grad)
    assert student.active_adapters() == ["default"]  # back on after the teacher's pass


def test_sdxl_lora_step_equals_the_sdxl_lora_script_math():
    """LCM-LoRA at SDXL (train_lcm_distill_lora_sdxl.py): no w embedding, the teacher the same UNet with its
    adapters off, the student its own target; loss and adapter gradients as the script's eager math."""
    from rglcd_fast.train.models import WithoutAdapters, add_lora

    torch.manual_seed(0)
    unet = add_lora(tiny_unet(time_cond_proj_dim=None, xl=True), 4, 4)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # let the adapters matter (lora_B starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    config = DistillationConfig(w_min=3.0)
    latents, embeds = torch.randn(3, 4, 8, 8), torch.randn(3, 5, unet.config.cross_attention_dim)
    added = dict(text_embeds=torch.randn(3, 8), time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3))
    uncond = torch.zeros_like(embeds)
    solver = lcd_script.DDIMSolver(scheduler.alphas_cumprod.numpy(), 1000, config.num_ddim_timesteps)
    teacher = WithoutAdapters(unet)
    loss, _, _ = lcd_script.lcd_step(
        unet, teacher, unet, latents, embeds, uncond, scheduler, solver, config, torch.Generator().manual_seed(7),
        added=added,
    )  # fmt: skip
    out = DistillationStep(scheduler, config)(
        unet, teacher, unet, latents, embeds, uncond, generator=torch.Generator().manual_seed(7),
        added_cond_kwargs=added, uncond_added_cond_kwargs=dict(added, text_embeds=torch.zeros(3, 8)),
    )  # fmt: skip
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(loss, params)):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7
