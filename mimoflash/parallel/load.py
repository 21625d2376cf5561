"""Build one rank's model (parallel/modules.py classes at the rank's shapes) and fill it with the rank's slices.

The module tree is built on the `meta` device and cast (the router stays fp32, `MiMoForCausalLM.cast`), then
materialised empty and filled tensor by tensor from a reader (parallel/shard.py): nothing is randomly initialised
and no full-size tensor is ever allocated. Every parameter is checked against the full model's shape first, so a
checkpoint that does not match fails before any data is read.
"""

from __future__ import annotations

import torch

from ..checkpoint.keys import SCALE_SUFFIX
from ..checkpoint.loader import CheckpointError
from ..model.layers import RotaryEmbedding
from ..model.mimo import MiMoForCausalLM
from .fp8 import fill_fp8, swap_fp8
from .modules import ParallelMiMoForCausalLM
from .shard import ShardPlan

_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def build_shard(plan: ShardPlan, reader, dtype: torch.dtype, device: torch.device,
                fp8: bool = False) -> ParallelMiMoForCausalLM:
    """fp8: the checkpoint's block-FP8 projections and experts stay FP8 (parallel/fp8.py; a CheckpointReader)."""
    cfg = plan.config
    with torch.device("meta"):
        model = ParallelMiMoForCausalLM(plan).cast(dtype)
        full = MiMoForCausalLM(cfg.replace(num_nextn_predict_layers=model.config.num_nextn_predict_layers)).state_dict()
    grids = swap_fp8(model, plan, reader) if fp8 else {}
    model.to_empty(device=device)
    rc = model.config
    if rc.tie_word_embeddings:                  # to_empty replaces meta parameters one by one, breaking the tie
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, (rd, theta) in {"full": (rc.rotary_dim(False), rc.rope_theta),
                              "sliding": (rc.rotary_dim(True), rc.swa_rope_theta)}.items():
        model.model.rotary[name].inv_freq = RotaryEmbedding(rd, theta).inv_freq.to(device)
    kept_fp8 = set(grids) | {n + SCALE_SUFFIX for n in grids}                # filled by fill_fp8
    slots = {n: t for n, t in model.state_dict(keep_vars=True).items()
             if not (n == "lm_head.weight" and rc.tie_word_embeddings) and n not in kept_fp8}
    problems = []
    for name in slots:
        got = reader.shape(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif tuple(got) != tuple(full[name].shape):
            problems.append(f"{name}: checkpoint {list(got)} vs model {list(full[name].shape)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(problems[:20]))
    with torch.no_grad():
        for name, slot in slots.items():
            t = reader.read(name, plan.index(name))
            if name in _VOCAB and t.shape[0] < slot.shape[0]:             # the padded tail of the last range
                slot.zero_()
                slot[:t.shape[0]].copy_(t)
            else:
                slot.copy_(t)
            del t
        if fp8:
            fill_fp8(model, plan, reader, grids)
    reader.close()
    return model.eval()


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters, buffers and the tensors its modules keep
    (fused or re-laid-out copies), plus the bytes of its FP8 experts in the mapped files (read when routed): what
    the rank holds for weights."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        for v in vars(m).values():
            for x in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(x, torch.Tensor):
                    add(x)
                elif hasattr(x, "wp") and isinstance(getattr(x, "wp"), torch.Tensor):     # packed panels
                    add(x.wp)
    store = getattr(model, "expert_store", None)          # FP8 experts: views of the files, read when routed
    return sum(seen.values()) + (store.total_bytes if store is not None else 0)
