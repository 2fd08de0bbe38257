"""Attention over a slotted KV cache, for a step that mixes decodes and prefill chunks.

KV cache of one layer: ``k, v [num_slots, kv_heads, max_len, head_dim]``; a sequence owns one
slot for its lifetime. A step's tokens are flattened: first the ``num_decode`` decode tokens
(one per sequence), then the prefill chunks one sequence after another.
"""

from __future__ import annotations

import array
import contextlib
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def long_tensor(values: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 tensor of a Python int list: through array.array, ~7x faster than torch.tensor
    for the 8192-token lists of a long prefill (1.3 -> 0.2 ms on the 2-core box)."""
    t = torch.frombuffer(array.array("q", values), dtype=torch.long) if values else torch.empty(0, dtype=torch.long)
    return t.to(device)


@dataclass
class AttentionMetadata:
    """What attention needs to know about one flattened step of N tokens.

    token_slots [N]: cache slot of each token; positions [N]: its position in its sequence.
    Decodes: ``decode_slots [B]``, and for batched attention over slots ``[0, decode_hi)``:
    ``decode_mask() [decode_hi, 1, 1, decode_len]`` (True = attend; None when every slot in
    range has the same length).
    Prefill chunks: ``prefills`` list of (slot, start, length) in token order after the decodes.
    """

    token_slots: torch.Tensor
    positions: torch.Tensor
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None
    decode_hi: int = 0
    decode_len: int = 0
    # context length per slot in [0, decode_hi) when they differ (None: all equal); the mask is
    # built from it on first use only, since on CUDA the decode rows go through the Triton kernel
    # and the mask's host-to-device copy would be wasted
    decode_ctx: list[int] | None = None
    decode_dense: bool = False  # decode_slots == arange(num_decode): no scatter/gather needed
    decode_ctx_lens: torch.Tensor | None = None  # [B] position + 1 of each decode token
    prefills: list[tuple[int, int, int]] = field(default_factory=list)
    # decode-only steps of fixed shape (``for_decode``: the static buffers of a CUDA graph): keys
    # [0, ctx_lens[b]) of slot token_slots[b] are attended, through the Triton decode kernel on
    # CUDA. Eager steps (``build``) give their decode rows' lengths in ``decode_ctx_lens`` (the same
    # kernel on CUDA; SDPA over ``decode_mask()`` elsewhere)
    ctx_lens: torch.Tensor | None = None
    static: bool = False  # shapes fixed, values live in device buffers: no host-side branching
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def for_decode(cls, slots: torch.Tensor, positions: torch.Tensor, ctx_lens: torch.Tensor) -> "AttentionMetadata":
        """A decode-only step whose per-row slot/position/context length are tensors (e.g. the
        static buffers of a CUDA graph); padding rows point at a scratch slot."""
        return cls(token_slots=slots, positions=positions, num_decode=int(slots.shape[0]),
                   decode_slots=slots, ctx_lens=ctx_lens, static=True)

    def decode_mask(self) -> torch.Tensor | None:
        """[decode_hi, 1, 1, decode_len] bool, True = attend (None when every slot has the same length)."""
        if self.decode_ctx is None:
            return None
        if self._decode_mask is None:
            dev = self.token_slots.device
            ctx_t = torch.tensor(self.decode_ctx, dtype=torch.long, device=dev)
            self._decode_mask = (torch.arange(self.decode_len, device=dev)[None, :] < ctx_t[:, None]).view(
                self.decode_hi, 1, 1, self.decode_len)
        return self._decode_mask

    @classmethod
    def build(
        cls, decodes: list[tuple[int, int]], prefills: list[tuple[int, int, int]],
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """decodes: (slot, position) per decode token; prefills: (slot, start, length)."""
        slots: list[int] = [s for s, _ in decodes]
        pos: list[int] = [p for _, p in decodes]
        for s, start, n in prefills:
            slots.extend([s] * n)
            pos.extend(range(start, start + n))
        meta = cls(
            token_slots=long_tensor(slots, device),
            positions=long_tensor(pos, device),
            num_decode=len(decodes),
            prefills=list(prefills),
        )
        if decodes:
            hi = max(slots[: len(decodes)]) + 1
            ctx = [1] * hi  # unused slots attend to position 0 so softmax stays finite
            for s, p in decodes:
                ctx[s] = p + 1
            length = max(ctx)
            meta.decode_slots = meta.token_slots[: len(decodes)]
            meta.decode_hi = hi
            meta.decode_len = length
            if min(ctx) < length:  # equal lengths (e.g. a batch started together): no mask needed
                meta.decode_ctx = ctx
            meta.decode_dense = slots[: len(decodes)] == list(range(len(decodes)))
            meta.decode_ctx_lens = meta.positions[: len(decodes)] + 1
        return meta


def sdpa_backends(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The SDPA backends our attention runs with, as a context (the model's forward enters it once
    per step): on CUDA every backend but cuDNN, elsewhere torch's defaults.

    cuDNN's SDPA builds a new plan for every new key length, i.e. every decode step (~30 ms per
    layer per step measured on an H100); flash and memory-efficient attention have no such cost.
    Long fresh prefills still pick cuDNN explicitly (``_cudnn_causal_prefill``, lengths padded to
    buckets so few plans are built). Scoped: the process's global SDPA settings are left as they
    are, so other code in the process (transformers, say) keeps its own choice."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attend_fp8_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, kv_written: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``attend`` for a block-FP8 o projection: (out, out_fp8). In a CUDA-graph decode step with
    D = 128 the Triton decode kernel also writes the output quantized per row and head
    ((q [N, Hq * D] e4m3, scales [N, Hq]); the o projection then skips its quantization launch);
    elsewhere out_fp8 is None."""
    if q.shape[2] == 128 and _triton_decode_step(q, meta):
        from eplb.kernels.decode_attention import decode_attention

        if not kv_written:
            _write_kv(k, v, k_cache, v_cache, meta)
        return decode_attention(q, k_cache, v_cache, meta.token_slots, meta.ctx_lens, scale, fp8_out=True)
    return attend(q, k, v, k_cache, v_cache, meta, scale, kv_written), None


def _static_decode_step(q: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Every row decodes, with static metadata (a CUDA-graph step or its eager twin)."""
    return q.shape[0] > 0 and meta.num_decode == q.shape[0] and meta.static


def _triton_decode_step(q: torch.Tensor, meta: AttentionMetadata) -> bool:
    """A static decode step on a device the Triton decode-attention kernel runs on."""
    from eplb.kernels import triton_usable

    return _static_decode_step(q, meta) and triton_usable(q.device)


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
    """The decode rows of an eager step (q [num_decode, Hq, D]) through the Triton decode kernel."""
    from eplb.kernels.decode_attention import decode_attention

    return decode_attention(q, k_cache, v_cache, meta.decode_slots, meta.decode_ctx_lens, scale)


def _write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              meta: AttentionMetadata) -> None:
    # cache[slot, :, pos] = k  (advanced indices on dims 0 and 2 -> value shape [N, Hkv, D])
    k_cache[meta.token_slots, :, meta.positions] = k
    v_cache[meta.token_slots, :, meta.positions] = v


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, kv_written: bool = False,
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] (already rotated) -> [N, Hq, D]; writes k/v into the cache
    (unless ``kv_written``: the fused q/k-norm + RoPE kernel already did)."""
    n, hq, d = q.shape
    if n == 0:
        return q.new_empty(n, hq, d)
    if not kv_written:
        _write_kv(k, v, k_cache, v_cache, meta)
    nd = meta.num_decode
    if _static_decode_step(q, meta):
        if _triton_decode_step(q, meta):
            from eplb.kernels.decode_attention import decode_attention

            return decode_attention(q, k_cache, v_cache, meta.token_slots, meta.ctx_lens, scale)
        return decode_attention_torch(q, k_cache, v_cache, meta.token_slots, meta.ctx_lens, scale)
    # eager steps on CUDA: the decode rows go through the Triton decode kernel too. SDPA cannot
    # take them well: with a length mask and GQA it falls back to its math backend, which on an
    # H100 made a full-size step of 255 decodes + one 512-token prompt take 420 ms instead of
    # about 60 (scripts/dev/profile_mixed.py)
    from eplb.kernels import triton_usable

    kernel = nd > 0 and d >= 16 and not d & (d - 1) and triton_usable(q.device)
    if kernel and nd == n:
        return _decode_rows(q, k_cache, v_cache, meta, scale)
    if nd == n and meta.decode_dense:  # decode-only step over packed slots: no copies
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k_cache[:nd, :, : meta.decode_len], v_cache[:nd, :, : meta.decode_len],
            attn_mask=meta.decode_mask(), scale=scale, enable_gqa=True,
        )
        return o.squeeze(2)
    out = q.new_empty(n, hq, d)
    if kernel:
        out[:nd] = _decode_rows(q[:nd], k_cache, v_cache, meta, scale)
    elif nd:
        hi, length = meta.decode_hi, meta.decode_len
        if meta.decode_dense:
            qd = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
        else:
            qd = q.new_zeros(hi, hq, 1, d)
            qd[meta.decode_slots] = q[:nd].unsqueeze(2)
        o = F.scaled_dot_product_attention(
            qd, k_cache[:hi, :, :length], v_cache[:hi, :, :length], attn_mask=meta.decode_mask(),
            scale=scale, enable_gqa=True,
        )
        out[:nd] = o[:nd, :, 0] if meta.decode_dense else o[meta.decode_slots, :, 0]
    off = nd
    gpu_half = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    run: list[int] = []  # lengths of consecutive fresh short chunks, attended by one varlen call
    for slot, start, cnt in meta.prefills:
        if gpu_half and start == 0 and cnt < CUDNN_PREFILL_MIN and _varlen_attn is not None:
            run.append(cnt)
            off += cnt
            continue
        if run:
            _varlen_prefill(q, k, v, out, off - sum(run), run, scale)
            run = []
        qp = q[off : off + cnt].transpose(0, 1).unsqueeze(0)  # [1, Hq, cnt, D]
        kp = k_cache[slot : slot + 1, :, : start + cnt]
        vp = v_cache[slot : slot + 1, :, : start + cnt]
        if start == 0 and cnt >= CUDNN_PREFILL_MIN and gpu_half:
            o = _cudnn_causal_prefill(q[off : off + cnt], k_cache, v_cache, slot, scale)
        elif start == 0:
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            i = torch.arange(cnt, device=q.device)[:, None]
            j = torch.arange(start + cnt, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=j <= i + start, scale=scale, enable_gqa=True
            )
        out[off : off + cnt] = o[0].transpose(0, 1)
        off += cnt
    if run:
        _varlen_prefill(q, k, v, out, off - sum(run), run, scale)
    return out


try:  # flash varlen (torch >= 2.10): many fresh prefills in one launch, GQA native
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


def _varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, first: int,
                    lengths: list[int], scale: float) -> None:
    """Causal attention of consecutive fresh prefill chunks (rows [first, first + sum(lengths))
    of this step, each starting at position 0): their keys are exactly this step's k/v rows, so
    one flash varlen call covers them all (per-sequence SDPA: 0.46 vs 0.07 ms for 8 prompts of
    16-512 tokens on the H100, launch-bound)."""
    total = sum(lengths)
    cu = long_tensor([0] + list(itertools.accumulate(lengths)), q.device).to(torch.int32)
    rows = slice(first, first + total)
    out[rows] = _varlen_attn(q[rows], k[rows], v[rows], cu, cu, max(lengths), max(lengths),
                             scale=scale, window_size=(-1, 0))


# Long fresh prefills on CUDA use cuDNN's attention: on an H100 at 8192 tokens (32 q /
# 4 kv heads, D 128, causal) 0.90 ms vs 1.73 ms for flash (scripts/dev/sdpa_prefill.py). cuDNN
# builds a graph per new shape (~43 ms), so the length is padded up to a multiple of
# CUDNN_PREFILL_BUCKET: at most max_len / bucket shapes are ever built.
CUDNN_PREFILL_MIN = 1024
CUDNN_PREFILL_BUCKET = 1024


def _cudnn_causal_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int,
                          scale: float) -> torch.Tensor:
    """Causal attention of a prefill chunk starting at position 0. q [n, Hq, D] -> [1, Hq, n, D].

    Queries are zero-padded to the bucket length; keys/values are the cache rows [0, padded) of
    the slot as they are: rows past n are only ever seen by the padding queries (causal mask),
    whose outputs are dropped."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, hq, d = q.shape
    max_len = k_cache.shape[2]
    padded = min(-(-n // CUDNN_PREFILL_BUCKET) * CUDNN_PREFILL_BUCKET, max_len)
    if padded == n:  # already a bucket length: the strided view, no copy
        qp = q.transpose(0, 1).unsqueeze(0)
    else:
        qp = q.new_zeros(1, hq, padded, d)
        qp[0, :, :n] = q.transpose(0, 1)
    kp = k_cache[slot : slot + 1, :, :padded]
    vp = v_cache[slot : slot + 1, :, :padded]
    # cuDNN first; flash if cuDNN declines these strides/shapes
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
    return o[:, :, :n]


def decode_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    ctx_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Decode attention in plain torch: the CPU path of static (graph-shaped) decode steps and the
    reference of ``eplb.kernels.decode_attention``, same arguments (float32 math, any device).

    q [B, Hq, D]; k/v_cache [S, Hkv, L, D]; slots [B]; ctx_lens [B]: row b attends keys
    [0, ctx_lens[b]) of slot slots[b] (GQA: q head h uses kv head h // (Hq // Hkv)). -> [B, Hq, D].
    Reads keys up to max(ctx_lens) (a host sync); rows with ctx_len 0 give zeros.
    """
    b, hq, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    ctx = ctx_lens.long().clamp(0, max_len)
    n = int(ctx.max()) if b else 0
    if b == 0 or n == 0:
        return q.new_zeros(b, hq, d)
    k = k_cache[slots.long(), :, :n].float()  # [B, Hkv, n, D]
    v = v_cache[slots.long(), :, :n].float()
    qg = q.float().view(b, hkv, hq // hkv, d)  # head h = kvh * G + g  ->  kv head h // G
    mask = (torch.arange(n, device=q.device)[None, :] < ctx[:, None]).view(b, 1, 1, 1, n)
    o = F.scaled_dot_product_attention(qg.unsqueeze(3), k.unsqueeze(2), v.unsqueeze(2), attn_mask=mask, scale=scale)
    o = torch.where((ctx > 0).view(b, 1, 1, 1, 1), o, 0.0)  # all-masked rows: SDPA gives NaN
    return o.reshape(b, hq, d).to(q.dtype)
