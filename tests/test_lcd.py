"""rglcd_fast.lcd: drop-ins for the LCD training script's helpers give the script's results."""

import lcd_script
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import DEVICES, SD_SCHEDULE, assert_tight

from rglcd_fast import lcd, ops

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def script_setup(device, prediction_type="epsilon", bsz=5, seed=0):
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    ac = noise_scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 50, (bsz,), generator=g)
    index[0], index[-1] = 0, 49
    tensors = [torch.randn(bsz, 4, 8, 8, generator=g) for _ in range(4)]
    w = (15 - 5) * torch.rand((bsz,), generator=g) + 5
    return (
        ac,
        torch.sqrt(ac).to(device),
        torch.sqrt(1 - ac).to(device),
        index.to(device),
        *(t.to(device) for t in tensors),
        w.to(device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_predicted_sample_and_noise(dtype, prediction_type, device):
    ac, alphas, sigmas, index, m, x, _, _, _ = script_setup(device, prediction_type)
    t = lcd_script.DDIMSolver(ac.numpy()).ddim_timesteps.to(device)[index]
    m, x = m.to(dtype), x.to(dtype)
    for name in ("get_predicted_original_sample", "get_predicted_noise"):
        expected = getattr(lcd_script, name)(m, t, x, prediction_type, alphas, sigmas)
        actual = getattr(lcd, name)(m, t, x, prediction_type, alphas, sigmas)
        assert actual.dtype == expected.dtype  # float32 where the script multiplies by the schedule
        assert_tight(actual, expected, name, tol=2e-6)


def test_scalings_and_embedding():
    t = torch.tensor([0, 19, 259, 999])
    for a, b in zip(lcd.scalings_for_boundary_conditions(t), lcd_script.scalings_for_boundary_conditions(t)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    w = torch.tensor([5.0, 7.5, 15.0])
    for dim in (256, 7):
        torch.testing.assert_close(lcd.guidance_scale_embedding(w, dim), lcd_script.guidance_scale_embedding(w, dim))
    with pytest.raises(ValueError, match="w"):
        lcd.guidance_scale_embedding(w[None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_solver(prediction_type, device):
    ac, alphas, sigmas, index, cond, uncond, noisy, _, w = script_setup(device, prediction_type)
    ours, theirs = lcd.DDIMSolver(ac.numpy()).to(device), lcd_script.DDIMSolver(ac.numpy()).to(device)
    for name in ("ddim_timesteps", "ddim_alpha_cumprods", "ddim_alpha_cumprods_prev"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    start = theirs.ddim_timesteps[index]
    # the script's teacher block: x0 and ε of both outputs, CFG, solver step
    args = (start, noisy, prediction_type, alphas, sigmas)
    cond_x0, uncond_x0 = (lcd_script.get_predicted_original_sample(o, *args) for o in (cond, uncond))
    cond_eps, uncond_eps = (lcd_script.get_predicted_noise(o, *args) for o in (cond, uncond))
    w4 = w.reshape(-1, 1, 1, 1)
    pred_x0 = cond_x0 + w4 * (cond_x0 - uncond_x0)
    pred_noise = cond_eps + w4 * (cond_eps - uncond_eps)
    x_prev = theirs.ddim_step(pred_x0, pred_noise, index)
    assert_tight(ours.ddim_step(pred_x0, pred_noise, index), x_prev, "ddim_step", tol=0)
    fused_prev, fused_x0 = ours.guided_ddim_step(cond, uncond, noisy, index, w, prediction_type)
    assert_tight(fused_x0, pred_x0, "pred_x0", tol=1e-6)
    assert_tight(fused_prev.double(), x_prev, "x_prev", tol=1e-6, scale=pred_x0.abs().max().item())


def test_fused_loss_equals_the_script_loss():
    """The script's student/target/loss lines vs one ops.consistency_loss call."""
    ac, alphas, sigmas, index, noise_pred, noisy, target, _, _ = script_setup("cpu")
    start = lcd_script.DDIMSolver(ac.numpy()).ddim_timesteps[index]
    c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in lcd_script.scalings_for_boundary_conditions(start))
    pred_x0 = lcd_script.get_predicted_original_sample(noise_pred, start, noisy, "epsilon", alphas, sigmas)
    model_pred = c_skip * noisy + c_out * pred_x0
    loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + 0.001**2) - 0.001)
    fused_loss, fused_pred = ops.consistency_loss(noise_pred, noisy, start, target, ac, "epsilon", "huber", 0.001)
    assert_tight(fused_pred, model_pred, "model_pred", tol=2e-6)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-7)
