"""Tensor- and expert-parallel inference over torch.distributed: `LLM(model, tensor_parallel_size=N)`.

shard.py (who holds what, sliced reads), modules.py (the rank's module classes and their collectives), load.py
(building a rank's model), fp8.py (FP8 slices kept compressed), fused.py (the fused decode step per rank), mtp.py
(MTP drafting on every rank), group.py (processes, the step plan, failures). docs/PARALLEL.md is the user's guide.
"""

from .group import ParallelError

__all__ = ["ParallelError"]
