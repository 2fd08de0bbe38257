"""Expert compute for the CPU at decode sizes: :func:`padded_expert_forward`.

At a few rows per expert, MKL's per-expert sgemm runs on one thread far below the core's
peak (the per-slot loop / ``torch._grouped_mm`` path). Laying the rows out as a padded
``[S, m_max, H]`` block and running one ``torch.bmm`` per projection lets the batched GEMM
spread the experts over the intra-op threads. Padding costs FLOPs, so it is only used when the
block is at least a third full (decode of ~32 sequences with top-4 over 32 experts: ~1.25x
per MoE layer on the 2-core bench machine; below ~64 rows it measured no faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 64  # below this the padded block measured no faster than per-expert GEMMs
MAX_PAD = 3  # use the padded block only if num_slots * max_rows <= MAX_PAD * rows


def padded_expert_forward(
    x: torch.Tensor, local_slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor | None:
    """x [N, H], local_slot [N] in [0, S), w13 [S, 2I, H], w2 [S, H, I] -> [N, H], or None
    when the padded block would be mostly padding (the caller then uses per-expert GEMMs).

    (A GEMV pair per row for a handful of rows measured 20% faster at batch 1, but its rows
    differ in the last bit from the grouped GEMM's, which breaks the bitwise EP == single
    process check; so small batches stay on the grouped GEMM.)
    """
    n, h = x.shape
    num_slots, inter = w13.shape[0], w2.shape[2]
    if n < MIN_ROWS:
        return None
    counts = torch.bincount(local_slot, minlength=num_slots)
    m = int(counts.max())
    if num_slots * m > MAX_PAD * n:
        return None
    order = torch.argsort(local_slot, stable=True)
    sorted_slot = local_slot[order]
    # row r of the sorted rows sits at (its slot, its rank within the slot)
    pos = sorted_slot * m + (torch.arange(n, device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_slot])
    block = x.new_zeros(num_slots * m, h)
    block.index_copy_(0, pos, x.index_select(0, order))
    gu = torch.bmm(block.view(num_slots, m, h), w13.transpose(1, 2))  # [S, m, 2I]
    y = torch.bmm(F.silu(gu[..., :inter]) * gu[..., inter:], w2.transpose(1, 2))  # [S, m, H]
    out = x.new_empty(n, h)
    out.index_copy_(0, order, y.view(num_slots * m, h).index_select(0, pos))
    return out
