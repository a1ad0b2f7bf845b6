"""The public ops (torch.ops.rglcd_fast.* underneath), one module per family."""
from .consistency import (boundary_scalings, consistency_loss, consistency_output, predicted_eps,
                          predicted_x0)

__all__ = ["boundary_scalings", "predicted_x0", "predicted_eps", "consistency_output", "consistency_loss"]
