"""Pure-PyTorch versions of every op: the spec in code (docs/design.md §2), the test oracle, the
benchmark baseline, and the kernels used where the compiled extension is absent."""

from . import consistency, reward, solver

__all__ = ["consistency", "reward", "solver"]
