"""Tensor- and expert-parallel inference over torch.distributed: `LLM(model, tensor_parallel_size=N)`.

shard.py (who holds what, sliced reads), modules.py (the rank's module classes and their collectives), load.py
(building a rank's model), group.py (processes, the step plan, failures). docs/PARALLEL.md is the user's guide.
"""

from .group import ParallelError

__all__ = ["ParallelError"]
