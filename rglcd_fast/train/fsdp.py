"""Fully sharded students (FSDP2, ``torch.distributed.fsdp.fully_shard``): the full student and its EMA target
sharded over every process, each resnet and transformer block a unit of its own, so that a full SDXL student
with its AdamW state fits where one copy per card does not. The same code runs on GPUs (NCCL) and on CPU
processes (gloo, the tests): accelerate's own FSDP plugin refuses CPU processes, so the trainer shards with
torch's API and hands accelerate only the optimiser and the LR schedule.

Checkpoints stay the trainer's atomic ones: the student and target are gathered whole onto rank 0 and written
as the unsharded student's safetensors (interchangeable with a DDP run's), the optimiser state whole as
torch.distributed.checkpoint's full optimiser state dict (keyed by parameter name). Every rank reads the files
on resume and keeps its shard. Gathered, not sharded, files: one format for every world size, readable without
torch.distributed, at the cost of rank 0 holding one whole copy on the CPU while it writes."""

import torch

from .checkpoint import GatheredState


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_unet(unet: torch.nn.Module, device_type: str, world_size: int) -> torch.nn.Module:
    """Shard a UNet in place over all processes: each ResnetBlock2D and BasicTransformerBlock, then the rest."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for block in [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]:
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def gather_state_dict(module: torch.nn.Module) -> dict:
    """The whole state dict on rank 0's CPU (empty elsewhere); a collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options())


class ShardedModule(GatheredState):
    """A sharded module as a checkpoint entry (<name>.safetensors, as the unsharded module's)."""

    kind = "module"

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return gather_state_dict(self.module)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True, strict=True))


class ShardedOptimizer(GatheredState):
    """The optimiser of a sharded module as a checkpoint entry (<name>.pt, the full state keyed by name)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=_full_options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(unet: torch.nn.Module):
    """Rank 0: a plain UNet2DConditionModel on the CPU with the sharded UNet's whole weights (None on the other
    ranks); a collective: call on every rank."""
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    state = gather_state_dict(unet)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(state, assign=True)
    return plain
