"""Drop-in diffusers schedulers whose step() runs one fused op.

`FusedLCMScheduler` and `FusedDDIMScheduler` subclass diffusers' `LCMScheduler` / `DDIMScheduler`:
same config, from_config / save_pretrained, set_timesteps, add_noise, scale_model_input and return
types; step() gives the same result for the same generator (noise is drawn exactly as diffusers
draws it) in one kernel, without synchronising with the device, so a denoising loop with them can
be captured in a CUDA graph:

    pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config)

As diffusers' step, it takes inputs of mixed dtypes (computing in their promoted dtype) and settings the
configuration does not use; a step that autograd must see through (an input that requires grad, grad mode on)
runs diffusers' own step, as the ops are forward only.
"""

import functools

import torch

# SchedulerMixin here: diffusers' pipeline loader looks a component's loadable base classes up in the module that
# model_index.json names for it (this one, for a pipeline saved with a fused scheduler)
from diffusers import DDIMScheduler, LCMScheduler, SchedulerMixin  # noqa: F401
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from . import ops
from .ops import solver as solver_ops


def _x0_limits(config) -> dict:
    """The clipping / thresholding settings as the ops take them; those diffusers' step does not read (it
    thresholds if asked, else clips if asked) at their defaults, so that any value passes there as in diffusers."""
    thresholding, clip = bool(config.thresholding), bool(config.clip_sample)
    return dict(
        clip_sample=clip,
        clip_sample_range=config.clip_sample_range if clip and not thresholding else 1.0,
        thresholding=thresholding,
        dynamic_thresholding_ratio=config.dynamic_thresholding_ratio if thresholding else 0.995,
        sample_max_value=config.sample_max_value if thresholding else 1.0,
    )


def _promoted(*tensors) -> list:
    """The tensors (None left) in their promoted dtype, the dtype diffusers' step computes in (a bf16 UNet output
    under autocast on float32 latents: float32); the ops take one dtype."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


class _FusedStepMixin:
    """What both fused schedulers need to call the ops from host-side state only."""

    def _schedule_on(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod on `device`, copied there once (diffusers keeps it on the CPU)."""
        if self.alphas_cumprod.device == device:
            return self.alphas_cumprod
        cache = self.__dict__.setdefault("_rglcd_schedule", {})
        cached = cache.get(device)
        if cached is None or cached.shape != self.alphas_cumprod.shape:
            cached = cache[device] = self.alphas_cumprod.to(device)
        return cached

    def _final_alpha_cumprod(self) -> float:
        return float(self.final_alpha_cumprod)  # a CPU tensor: no device sync

    @staticmethod
    def _timestep_tensor(timestep, device: torch.device) -> torch.Tensor:
        """The timestep as a tensor on `device`: a fill kernel for a number (no host-to-device copy)."""
        if isinstance(timestep, torch.Tensor):
            return timestep if timestep.device == device else timestep.to(device)
        return torch.full((), int(timestep), dtype=torch.long, device=device)

    def _timestep_value_on_host(self, timestep) -> int:
        """The timestep's value without a device sync when it is a number, a CPU tensor, or an element
        of self.timesteps (as pipelines pass them); any other device tensor is read back once."""
        if not isinstance(timestep, torch.Tensor):
            return int(timestep)
        host = self.__dict__.get("_rglcd_host_timesteps")
        if (
            timestep.device.type != "cpu"
            and host is not None
            and timestep.dim() == 0
            and timestep.untyped_storage().data_ptr() == self.timesteps.untyped_storage().data_ptr()
        ):
            return int(host[timestep.storage_offset() - self.timesteps.storage_offset()])
        return int(timestep.item())

    def _remember_host_timesteps(self):
        self._rglcd_host_timesteps = self.timesteps.cpu()


class FusedLCMScheduler(_FusedStepMixin, LCMScheduler):
    """diffusers' LCMScheduler with step() as the fused `lcm_step` op."""

    _compatibles = [*LCMScheduler._compatibles, "LCMScheduler"]
    # what _prepare_steps prepared for (none yet): step() prepares again when either was replaced
    _rglcd_timesteps = _rglcd_config = None

    @functools.wraps(LCMScheduler.set_timesteps)  # its signature: pipelines look for a `timesteps` parameter
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._prepare_steps()

    def _prepare_steps(self):
        """The host-side state of set_timesteps' schedule and the configuration, checked once here, not in every
        step(); step() calls it again where self.timesteps or the configuration was replaced since."""
        config = self.config
        constants = solver_ops.lcm_step_constants(  # checks the configuration first: a bad one changes nothing
            self._final_alpha_cumprod(),
            config.prediction_type,
            config.timestep_scaling,
            **_x0_limits(config),
        )
        self._remember_host_timesteps()
        self._rglcd_config, self._rglcd_timesteps, self._rglcd_constants = config, self.timesteps, constants
        self._rglcd_prev_timesteps = {}

    def restart(self) -> None:
        """Starts the schedule over: the next step() is its first. set_timesteps does it too, but rebuilds the
        timesteps on the device; this keeps them (a captured CUDA graph reads those tensors)."""
        self._step_index = None

    def _prev_timesteps_on(self, device: torch.device) -> list:
        """For each step index but the last, the schedule's next timestep as a [1] tensor on `device`,
        built once per set_timesteps."""
        cached = self._rglcd_prev_timesteps.get(device)
        if cached is None:
            timesteps = self.timesteps.to(device)
            cached = self._rglcd_prev_timesteps[device] = [timesteps[i : i + 1] for i in range(1, len(timesteps))]
        return cached

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
                raise ValueError(
                    f"timestep: expected one timestep for the batch, got a tensor of shape {timestep.shape}"
                )
            host, value = self._rglcd_host_timesteps, self._timestep_value_on_host(timestep)
            if value not in host:  # diffusers' index_for_timestep: an IndexError
                raise ValueError(f"timestep: {value} is not in the schedule set_timesteps made ({host.tolist()})")
            self._step_index = self.index_for_timestep(value, host)
        else:
            self._step_index = self._begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if solver_ops.needs_autograd(model_output, sample):  # the op is forward only
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.timesteps is not self._rglcd_timesteps or self.config is not self._rglcd_config:
            self._prepare_steps()  # e.g. an img2img loop's `scheduler.timesteps = scheduler.timesteps[k:]`
        if self._step_index is None:
            self._init_step_index(timestep)
        model_output, sample = _promoted(model_output, sample)
        # The host work of a step is most of its time on the GPU: the configuration was checked in
        # set_timesteps, autograd above, the next timesteps live on the device, and the op is called directly
        # (it checks the tensors it is given, naming the argument).
        device, index = sample.device, self._step_index
        t = self._timestep_tensor(timestep, device)
        prev_t = self._prev_timesteps_on(device)[index] if index + 1 < len(self.timesteps) else t
        noise, draw = None, False
        if index != self.num_inference_steps - 1:
            # randn_tensor's draw: torch.randn where it is the same, drawn by the op itself (in the step's
            # kernel on CUDA); randn_tensor for a generator on another device or a list of generators
            if generator is None or (isinstance(generator, torch.Generator) and generator.device.type == device.type):
                draw = True
            else:
                noise = randn_tensor(model_output.shape, generator=generator, device=device, dtype=sample.dtype)
        prev_sample, denoised = solver_ops._lcm_step(
            model_output=model_output,
            sample=sample,
            timesteps=t,
            prev_timesteps=prev_t,
            alphas_cumprod=self._schedule_on(device),
            noise=noise,
            **self._rglcd_constants,
            draw_noise=draw,
            generator=generator if draw else None,
        )
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)


class FusedDDIMScheduler(_FusedStepMixin, DDIMScheduler):
    """diffusers' DDIMScheduler with step() as the fused `ddim_step` op."""

    _compatibles = [*DDIMScheduler._compatibles, "DDIMScheduler"]

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if solver_ops.needs_autograd(model_output, sample, variance_noise):
            return super().step(
                model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict
            )
        device = sample.device
        t = self._timestep_tensor(timestep, device)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps  # negative: final ᾱ, in the kernel
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either "
                    "`generator` or `variance_noise` stays `None`."
                )
            noise = (
                variance_noise
                if variance_noise is not None
                else randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            )
            if noise.shape != sample.shape:  # diffusers broadcasts it
                try:
                    noise = noise.expand(sample.shape)
                except RuntimeError:
                    raise ValueError(
                        f"variance_noise: shape {tuple(noise.shape)} does not broadcast to the sample's "
                        f"{tuple(sample.shape)}"
                    ) from None
        model_output, sample, noise = _promoted(model_output, sample, noise)
        config = self.config
        prev_sample, pred_original_sample = ops.ddim_step(
            model_output,
            sample,
            t,
            prev_t,
            self._schedule_on(device),
            noise=noise,
            final_alpha_cumprod=self._final_alpha_cumprod(),
            eta=float(eta),
            prediction_type=config.prediction_type,
            **_x0_limits(config),
            use_clipped_model_output=use_clipped_model_output,
        )
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
