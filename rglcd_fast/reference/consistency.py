"""Reference consistency family: LCM boundary scalings, x0 / ε from a model output, the consistency
output and the distillation loss, exactly as diffusers' train_lcm_distill_sd_wds.py computes them
(docs/design.md §2). Results are returned in the model output's dtype; the loss in float32 (float64)."""

import torch

from ._schedule import accumulation_dtype, alphas_sigmas


def boundary_scalings(timesteps, timestep_scaling=10.0, sigma_data=0.5):
    scaled_timestep = timestep_scaling * timesteps.to(accumulation_dtype(timesteps.dtype))
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _x0(model_output, sample, alphas, sigmas, prediction_type):
    if prediction_type == "epsilon":
        return (sample - sigmas * model_output) / alphas
    if prediction_type == "v_prediction":
        return alphas * sample - sigmas * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def _eps(model_output, sample, alphas, sigmas, prediction_type):
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alphas * model_output + sigmas * sample
    if prediction_type == "sample":
        return (sample - alphas * model_output) / sigmas
    raise ValueError(f"prediction_type: expected 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def predicted_x0(model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon"):
    alphas, sigmas = alphas_sigmas(alphas_cumprod, timesteps, sample)
    return _x0(model_output, sample, alphas, sigmas, prediction_type).to(model_output.dtype)


def predicted_eps(model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon"):
    alphas, sigmas = alphas_sigmas(alphas_cumprod, timesteps, sample)
    return _eps(model_output, sample, alphas, sigmas, prediction_type).to(model_output.dtype)


def _per_sample(values, ndim):
    return values.reshape(-1, *([1] * (ndim - 1)))


def consistency_output(
    model_output, sample, timesteps, alphas_cumprod, prediction_type="epsilon", timestep_scaling=10.0, sigma_data=0.5
):
    # in the latents' accumulation dtype (the script's int timesteps would give float32 scalings)
    c_skip, c_out = boundary_scalings(timesteps.to(accumulation_dtype(sample.dtype)), timestep_scaling, sigma_data)
    c_skip, c_out = _per_sample(c_skip, sample.dim()), _per_sample(c_out, sample.dim())
    alphas, sigmas = alphas_sigmas(alphas_cumprod, timesteps, sample)
    pred_x0 = _x0(model_output, sample, alphas, sigmas, prediction_type)
    return (c_skip * sample + c_out * pred_x0).to(model_output.dtype)


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
    model_pred = consistency_output(
        model_output, sample, timesteps, alphas_cumprod, prediction_type, timestep_scaling, sigma_data
    )
    acc = accumulation_dtype(model_pred.dtype)
    diff = model_pred.to(acc) - target.to(acc)
    if loss_type == "l2":
        loss = torch.mean(diff**2)
    elif loss_type == "huber":
        loss = torch.mean(torch.sqrt(diff**2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"loss_type: expected 'l2' or 'huber', got {loss_type!r}")
    return loss, model_pred
