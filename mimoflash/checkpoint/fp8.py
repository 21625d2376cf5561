"""Block-FP8 weights as MiMo-V2-Flash ships them (docs/MODEL.md §4.3): quantize, dequantize, and a slow reference.

Format. A 2-D weight W (rows = out features, cols = in features) is cut into tiles of `block = (br, bc)` elements
(128 x 128 in the release). Each tile gets one fp32 scale S, and its elements are stored as E4M3 floats
(`torch.float8_e4m3fn`: 4 exponent bits, 3 mantissa bits, no infinities, largest finite value 448):

    S[i, j]  = max |W[tile i, j]| / 448          (the tile's largest element lands on the top of the E4M3 range)
    Wq[r, c] = fp8(W[r, c] / S[r // br, c // bc])
    W[r, c] ~= float(Wq[r, c]) * S[r // br, c // bc]

The checkpoint stores S next to the weight as `<name>.weight_scale_inv`. Despite the name it is the *multiplier*
that maps FP8 back to real values, not 1/S: the name comes from the FP8 GEMM kernels, which treat the stored value
as the inverse of the quantization scale. This is the DeepSeek-V3 convention, which Xiaomi's release, SGLang, vLLM
and transformers' `FineGrainedFP8Config` all follow.

Ragged edges. When a dimension is not a multiple of the block, the last tile row or column is narrower. The scale
grid then has ceil-div shape `[ceil(rows / br), ceil(cols / bc)]`, and the narrow tile's scale comes from the
elements that exist. Every MiMo dimension is a multiple of 128, so the release has no ragged tiles. We support them
anyway, so that any block size works in tests and on custom models.

Zero tiles. An all-zero tile would give S = 0 and 0/0 = NaN. Such a tile gets S = 1 instead, and it still decodes
to exact zeros.

The fast paths are vectorised. When the tiles divide the weight evenly the scale is broadcast through a
(R, br, C, bc) view, with no expanded copy. `quantize_fp8_block_reference` / `dequantize_fp8_block_reference` loop
over the tiles one by one and exist only so that tests can check the fast paths bit for bit.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0     # torch.finfo(torch.float8_e4m3fn).max


def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    """[rows, cols] weight shape -> shape of its `weight_scale_inv` grid (ceil-div: ragged edge tiles count)."""
    (r, c), (br, bc) = tuple(shape), tuple(block)
    return (-(-r // br), -(-c // bc))


def _check_block(block) -> tuple[int, int]:
    block = tuple(block)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"FP8 block size must be two positive ints (rows, cols), got {block!r}")
    return block


def _expand(scale_RC: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Per-tile scale (R, C) -> per-element scale (r, c), cropped at ragged edges."""
    (r, c), (br, bc) = shape, block
    return scale_RC.repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """W (r, c), any float dtype -> (Wq float8_e4m3fn (r, c), scale_inv fp32 (ceil(r/br), ceil(c/bc)))."""
    br, bc = _check_block(block)
    if w.dim() != 2:
        raise ValueError(f"block-FP8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    r, c = w.shape
    R, C = scale_shape(w.shape, block)
    w32 = w.float()
    if (r, c) == (R * br, C * bc):
        tiles = w32.view(R, br, C, bc)                                         # (R, br, C, bc)
    else:  # zero padding leaves each ragged tile's max |w| unchanged
        tiles = torch.zeros(R * br, C * bc, dtype=torch.float32, device=w.device)
        tiles[:r, :c] = w32
        tiles = tiles.view(R, br, C, bc)
    amax_RC = tiles.abs().amax(dim=(1, 3))                                     # (R, C)
    del tiles
    tiny = torch.finfo(torch.float32).tiny
    scale_RC = torch.where(amax_RC > 0, (amax_RC / FP8_MAX).clamp_min(tiny), torch.ones_like(amax_RC))
    if (r, c) == (R * br, C * bc):
        q = (w32.view(R, br, C, bc) / scale_RC[:, None, :, None]).view(r, c)
    else:
        q = w32 / _expand(scale_RC, (r, c), (br, bc))
    return q.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_RC


def dequantize_fp8_block(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16, name: str = "weight") -> torch.Tensor:
    """(Wq (r, c), scale_inv (ceil(r/br), ceil(c/bc))) -> W (r, c) in `dtype`; the product is taken in fp32.

    `name` is the checkpoint name used in error messages."""
    br, bc = _check_block(block)
    if w_fp8.dim() != 2:
        raise ValueError(f"{name}: block-FP8 weight must be 2-D, got shape {tuple(w_fp8.shape)}")
    r, c = w_fp8.shape
    R, C = scale_shape(w_fp8.shape, block)
    if tuple(scale_inv.shape) != (R, C):
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected ({R}, {C}) for a "
                         f"{r}x{c} weight in {br}x{bc} blocks")
    s = scale_inv.float()
    if (r, c) == (R * br, C * bc):
        out = (w_fp8.float().view(R, br, C, bc) * s[:, None, :, None]).view(r, c)
    else:
        out = w_fp8.float() * _expand(s, (r, c), (br, bc))
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------- slow references
def quantize_fp8_block_reference(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile at a time; same result as `quantize_fp8_block`. For tests only."""
    br, bc = block
    r, c = w.shape
    R, C = scale_shape(w.shape, block)
    q = torch.empty(r, c, dtype=FP8_DTYPE)
    s = torch.empty(R, C, dtype=torch.float32)
    for i in range(R):
        for j in range(C):
            tile = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            amax = tile.abs().max()
            s[i, j] = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny) if amax > 0 else 1.0
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (tile / s[i, j]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def dequantize_fp8_block_reference(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[r, c] = float(Wq[r, c]) * S[r // br, c // bc], tile by tile. For tests only."""
    br, bc = block
    out = torch.empty(w_fp8.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[rows, cols] = w_fp8[rows, cols].float() * scale_inv[i, j].float()
    return out.to(dtype)
