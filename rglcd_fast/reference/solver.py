"""Reference solver family: the teacher's guided DDIM solver step of LCD training, written as the public
LCD script (diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py) writes it, and the
LCM / DDIM sampling steps, written as diffusers' LCMScheduler.step and DDIMScheduler.step write them,
with every per-timestep scalar a per-sample tensor (docs/design.md §2). Math in float32 (float64 for
float64 inputs); results in the input dtype."""

import torch

from ._schedule import accumulation_dtype, check_timesteps, extract_into_tensor
from .consistency import boundary_scalings

LCM_SIGMA_DATA = 0.5  # LCMScheduler's fixed sigma_data


def _per_sample(values: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).reshape(-1, *([1] * (ndim - 1)))


def _alpha_prod_prev(alphas_cumprod, prev_timesteps, final_alpha_cumprod, ndim):
    """alphas_cumprod[prev] where prev >= 0, else final_alpha_cumprod, shaped to broadcast per sample."""
    prev = prev_timesteps.reshape(-1).long()
    gathered = alphas_cumprod.gather(-1, prev.clamp(min=0))
    final = torch.full_like(gathered, final_alpha_cumprod)
    return torch.where(prev >= 0, gathered, final).reshape(-1, *([1] * (ndim - 1)))


def _check(timesteps, prev_timesteps, alphas_cumprod, allow_final):
    check_timesteps(timesteps, alphas_cumprod.numel())
    check_timesteps(prev_timesteps, alphas_cumprod.numel(), "prev_timesteps", allow_negative=allow_final)


# ---- the LCD script's teacher solver step ------------------------------------------------------


def get_predicted_original_sample(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.dim())
    sigmas = extract_into_tensor(sigmas, timesteps, sample.dim())
    if prediction_type == "epsilon":
        pred_x_0 = (sample - sigmas * model_output) / alphas
    elif prediction_type == "sample":
        pred_x_0 = model_output
    elif prediction_type == "v_prediction":
        pred_x_0 = alphas * sample - sigmas * model_output
    else:
        raise ValueError(f"prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    return pred_x_0


def get_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.dim())
    sigmas = extract_into_tensor(sigmas, timesteps, sample.dim())
    if prediction_type == "epsilon":
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_epsilon = (sample - alphas * model_output) / sigmas
    elif prediction_type == "v_prediction":
        pred_epsilon = alphas * model_output + sigmas * sample
    else:
        raise ValueError(f"prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    return pred_epsilon


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
    """The LCD script's CFG + DDIM solver step; prev_timesteps = max(t_start - T/N, 0) gives the script's
    DDIMSolver.ddim_alpha_cumprods_prev[index]. Returns (x_prev, pred_x0)."""
    _check(timesteps, prev_timesteps, alphas_cumprod, allow_final=False)
    ndim, dtype = sample.dim(), sample.dtype
    alpha_schedule = torch.sqrt(alphas_cumprod)
    sigma_schedule = torch.sqrt(1 - alphas_cumprod)
    # a Python number too, as the op takes it
    w = _per_sample(torch.as_tensor(guidance_scale, device=sample.device), ndim, accumulation_dtype(dtype))
    cond_pred_x0 = get_predicted_original_sample(
        cond_output, timesteps, sample, prediction_type, alpha_schedule, sigma_schedule
    )
    cond_pred_noise = get_predicted_noise(
        cond_output, timesteps, sample, prediction_type, alpha_schedule, sigma_schedule
    )
    uncond_pred_x0 = get_predicted_original_sample(
        uncond_output, timesteps, sample, prediction_type, alpha_schedule, sigma_schedule
    )
    uncond_pred_noise = get_predicted_noise(
        uncond_output, timesteps, sample, prediction_type, alpha_schedule, sigma_schedule
    )
    pred_x0 = cond_pred_x0 + w * (cond_pred_x0 - uncond_pred_x0)
    pred_noise = cond_pred_noise + w * (cond_pred_noise - uncond_pred_noise)
    # DDIMSolver.ddim_step, in float64 as the script's numpy tables make it
    alpha_cumprod_prev = extract_into_tensor(alphas_cumprod.double(), prev_timesteps, ndim)
    dir_xt = (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
    x_prev = alpha_cumprod_prev.sqrt() * pred_x0 + dir_xt
    return x_prev.to(dtype), pred_x0.to(dtype)


# ---- diffusers' sampling steps -------------------------------------------------------------------


def _threshold_sample(sample, dynamic_thresholding_ratio, sample_max_value):
    """diffusers DDPMScheduler._threshold_sample, flattening with flatten(1) (any rank, an empty batch)."""
    dtype = sample.dtype
    if sample.numel() == 0:  # torch.quantile refuses an empty input
        return sample
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # upcast for quantile calculation, and clamp not implemented for cpu half
    shape = sample.shape
    sample = sample.flatten(1)
    abs_sample = sample.abs()  # "a certain percentile absolute pixel value"
    s = torch.quantile(abs_sample, dynamic_thresholding_ratio, dim=1)
    s = torch.clamp(s, min=1, max=sample_max_value)  # When clamped to min=1, equivalent to standard clipping to [-1, 1]
    s = s.unsqueeze(1)  # (batch_size, 1) because clamp will broadcast along dim=0
    sample = torch.clamp(sample, -s, s) / s  # "we threshold xt0 to the range [-s, s] and then divide by s"
    return sample.reshape(shape).to(dtype)


def _clip_or_threshold(
    pred_original_sample, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
):
    if thresholding:
        return _threshold_sample(pred_original_sample, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return pred_original_sample.clamp(-clip_sample_range, clip_sample_range)
    return pred_original_sample


def _step_schedule(timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, ndim, dtype):
    _check(timesteps, prev_timesteps, alphas_cumprod, allow_final=True)
    acc = accumulation_dtype(dtype)
    alpha_prod_t = extract_into_tensor(alphas_cumprod, timesteps, ndim).to(acc)
    alpha_prod_t_prev = _alpha_prod_prev(alphas_cumprod, prev_timesteps, final_alpha_cumprod, ndim).to(acc)
    return alpha_prod_t, alpha_prod_t_prev


def check_noise_source(noise, draw_noise, generator, device):
    """lcm_step's noise comes from the noise argument, or (draw_noise) from the generator, which must be
    on the sample's device type (as torch.randn: a "cuda" generator has no index); ValueError otherwise."""
    if draw_noise and noise is not None:
        raise ValueError("noise: expected None with draw_noise=True (the op draws the noise), got a tensor")
    if generator is not None and not draw_noise:
        raise ValueError("generator: only used with draw_noise=True")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: expected a {device.type} generator (as sample), got one on {generator.device}")


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
    """LCMScheduler.step with prev_timesteps given (negative: final_alpha_cumprod) and noise an input;
    noise None is the last step (prev_sample = denoised), unless draw_noise, where the noise is drawn
    here as LCMScheduler.step draws it for a generator on the sample's device (or None).
    Returns (prev_sample, denoised)."""
    check_noise_source(noise, draw_noise, generator, sample.device)
    if draw_noise:
        noise = torch.randn(model_output.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    ndim, dtype = sample.dim(), sample.dtype
    alpha_prod_t, alpha_prod_t_prev = _step_schedule(
        timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, ndim, dtype
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    c_skip, c_out = boundary_scalings(timesteps.reshape(-1), timestep_scaling, LCM_SIGMA_DATA)
    c_skip = _per_sample(c_skip, ndim, alpha_prod_t.dtype)
    c_out = _per_sample(c_out, ndim, alpha_prod_t.dtype)

    if prediction_type == "epsilon":  # noise-prediction
        predicted_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    elif prediction_type == "sample":  # x-prediction
        predicted_original_sample = model_output.to(alpha_prod_t.dtype)
    elif prediction_type == "v_prediction":  # v-prediction
        predicted_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
    else:
        raise ValueError(f"prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")

    predicted_original_sample = _clip_or_threshold(
        predicted_original_sample,
        clip_sample,
        clip_sample_range,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
    )

    denoised = c_out * predicted_original_sample + c_skip * sample

    if noise is not None:
        prev_sample = alpha_prod_t_prev.sqrt() * denoised + beta_prod_t_prev.sqrt() * noise
    else:
        prev_sample = denoised.clone()  # a separate tensor: ops may not return aliases
    return prev_sample.to(dtype), denoised.to(dtype)


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
    """DDIMScheduler.step with prev_timesteps given (diffusers: t - T // num_inference_steps; negative:
    final_alpha_cumprod) and the variance noise an input (required when eta > 0).
    Returns (prev_sample, pred_original_sample)."""
    if eta > 0 and noise is None:
        raise ValueError(f"noise: required when eta > 0 (got eta = {eta})")
    ndim, dtype = sample.dim(), sample.dtype
    alpha_prod_t, alpha_prod_t_prev = _step_schedule(
        timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, ndim, dtype
    )
    beta_prod_t = 1 - alpha_prod_t

    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output.to(alpha_prod_t.dtype)
    elif prediction_type == "sample":
        pred_original_sample = model_output.to(alpha_prod_t.dtype)
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")

    pred_original_sample = _clip_or_threshold(
        pred_original_sample, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )

    # _get_variance
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)

    if use_clipped_model_output:
        # the pred_epsilon is always re-derived from the clipped x_0 in Glide
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)

    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    if eta > 0:
        prev_sample = prev_sample + std_dev_t * noise
    pred_original_sample = pred_original_sample.to(dtype)
    if pred_original_sample is model_output:  # "sample" unclipped: a separate tensor (ops may not return inputs)
        pred_original_sample = pred_original_sample.clone()
    return prev_sample.to(dtype), pred_original_sample
