"""The public ops (torch.ops.rglcd_fast.* underneath), one module per family."""

from .consistency import boundary_scalings, consistency_loss, consistency_output, predicted_eps, predicted_x0
from .reward import pairwise_preference_loss, reward_head
from .solver import ddim_step, guided_ddim_step, lcm_step

__all__ = [
    "boundary_scalings",
    "predicted_x0",
    "predicted_eps",
    "consistency_output",
    "consistency_loss",
    "guided_ddim_step",
    "lcm_step",
    "ddim_step",
    "reward_head",
    "pairwise_preference_loss",
]
