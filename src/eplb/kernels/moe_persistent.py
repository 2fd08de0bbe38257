"""The MoE layer at decode sizes in one launch: router matmul + top-k + load count + pair sort,
gate/up + SwiGLU, down + routing weight + sum over k.

At batch 1 a decode step is launch-bound: the MoE half of a layer was four launches (router,
sort, gate/up, down), each paying its launch, its dependent first loads and the tail of a small
grid (about 30 us per layer against 13 us of weight bytes on an H100). Here one persistent grid of
at most one program per SM runs the three phases of those launches back to back, a grid barrier
(``arrival.grid_sync``) between them, every program looping over the phase's work items:

1. the router items of ``routing._router_item`` (the last to finish runs the tail, with the pair
   sort of ``route_topk(..., pair_sort=...)``);
2. the gemm1 tiles of ``moe_triton._gemm1_tile``;
3. the gemm2 tiles of ``moe_triton._gemm2_tile``, with the sum over k (``SUM_K``).

The phases run the very code of those launches, so the result has their bits: the same as
``route_logits_topk(..., pair_sort=...)`` then ``fused_moe(..., pair_sort=..., all_local=True)``.

The grid barrier needs every program resident at once, which one program per SM of a kernel that
fits an SM gives on an idle GPU. A kernel on another stream that holds SMs while it waits for this
one (a collective whose peer waits on this rank's step) would deadlock it, so the MoE layer uses
this launch only for in-process experts (one process, no EP dispatcher: ``MOE_DECODE_MAX_TOKENS``).
Under triton's CPU interpreter the grid is one program, which runs every item in turn.
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

from eplb.kernels.arrival import arrival_counters, grid_sync, grid_sync_words
from eplb.kernels.moe_triton import FP8_BLOCK, _check, _gemm1_tile, _gemm2_tile, _weight_desc, get_config, new_pair_sort
from eplb.kernels.pdl import pdl_args, pdl_wait, prefetch_l2
from eplb.kernels.routing import (
    _BT,
    _EB,
    ROUTER_MATMUL_TOKENS_CAP,
    _router_item,
    _router_k_slice,
    _tail_args,
)

# the MoE layer runs calls of at most this many tokens through moe_decode (in-process experts, one
# replica per expert); 0 (off) until measured on a GPU: scripts/dev/ab_decode_fusions.py's
# ``with_moe_decode`` sets 16
MOE_DECODE_MAX_TOKENS = 0
# the one launch: warps and pipeline stages (one value for all three phases), programs per SM
# (where registers and shared memory allow), the idle programs' L2 prefetch of the down weights
# during gate/up, and the barrier's spin backoff
MOE_DECODE_LAUNCH = {"num_warps": 8, "num_stages": 4, "per_sm": 1, "prefetch_down": False, "backoff": False}
_SMS: dict[int, int] = {}


@triton.jit(do_not_specialize=["T", "n_real", "n_pairs", "max_m_blocks"])
def _moe_decode_kernel(
        x_ptr, g_ptr, b_ptr, part_ptr, rcnt_ptr, T, E, H, stride_x, stride_g,
        w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
        counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
        xq_ptr, xs_ptr, w13_ptr, w13_desc, ws13_ptr, hb_ptr, hs_ptr, w2_ptr, w2_desc, ws2_ptr, y_ptr, out_ptr,
        cnt_ptr, sync_cnt_ptr, sync_gen_ptr, n_pairs, I, max_m_blocks,
        stride_xq, stride_xs, stride_w13e, stride_w13n, stride_s13e, stride_s13n, stride_hm, stride_hs,
        stride_w2e, stride_w2n, stride_s2e, stride_s2n, stride_ym,
        BT: tl.constexpr, EB: tl.constexpr, KS: tl.constexpr, KSPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
        PREC: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BR: tl.constexpr,
        RENORM: tl.constexpr, COUNT: tl.constexpr, REAL_PTR: tl.constexpr, BM: tl.constexpr,
        S_PAD: tl.constexpr, J_PAD: tl.constexpr,
        FP8: tl.constexpr, H_FP8: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, GROUP_M1: tl.constexpr,
        EVEN_K1: tl.constexpr, SWAP1: tl.constexpr, TMA1: tl.constexpr,
        BN2: tl.constexpr, BK2: tl.constexpr, GROUP_M2: tl.constexpr, EVEN_K2: tl.constexpr,
        SWAP2: tl.constexpr, TMA2: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_DOWN: tl.constexpr = False,
        BACKOFF: tl.constexpr = False, LINE2: tl.constexpr = 128, HAS_MAP: tl.constexpr = True,
        SORT: tl.constexpr = True):
    """The three phases (module docstring); program p takes items p, p + P, p + 2P, ... of each.
    PREFETCH_DOWN: programs without a gemm1 tile spend that phase asking L2 for the down weights of
    the slots in use, so gemm2 reads them from L2. BACKOFF: see ``grid_sync``."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pdl_wait(USE_PDL)
    n_e = E // EB
    n_items = tl.cdiv(T, BT) * n_e * KSPLIT
    for it in range(pid, n_items, nprog):
        _router_item(it // (KSPLIT * n_e), (it // KSPLIT) % n_e, it % KSPLIT, n_items, x_ptr, g_ptr, b_ptr, part_ptr,
                     rcnt_ptr, T, E, H, stride_x, stride_g, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr,
                     n_real_ptr, n_real, counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
                     BT, EB, KS, KSPLIT, HAS_BIAS, PREC, K, K_PAD, E_PAD, BR, RENORM, HAS_MAP, COUNT, REAL_PTR,
                     False, SORT, BM, S_PAD, J_PAD)
    grid_sync(sync_cnt_ptr, sync_gen_ptr, nprog, BACKOFF)  # the pairs are sorted
    n1 = max_m_blocks * tl.cdiv(I, BN1)
    if PREFETCH_DOWN:  # noqa: SIM102 (a constexpr branch around a runtime one)
        if pid >= n1:
            _prefetch_down(w2_ptr, block_slot_ptr, num_post_ptr, stride_w2e, H * I, pid - n1, nprog - n1, BM, LINE2)
    for tile in range(pid, n1, nprog):
        _gemm1_tile(tile, xq_ptr, xs_ptr, w13_ptr, w13_desc, ws13_ptr, hb_ptr, hs_ptr, sorted_ptr, block_slot_ptr,
                    num_post_ptr, n_pairs, H, I, max_m_blocks, stride_xq, stride_xs, stride_w13e, stride_w13n,
                    stride_s13e, stride_s13n, stride_hm, stride_hs, K, BM, BN1, BK1, GROUP_M1, FP8, H_FP8, EVEN_K1,
                    SWAP1, TMA1)
    grid_sync(sync_cnt_ptr, sync_gen_ptr, nprog, BACKOFF)  # h is written
    for tile in range(pid, max_m_blocks * tl.cdiv(H, BN2), nprog):
        _gemm2_tile(tile, hb_ptr, hs_ptr, w2_ptr, w2_desc, ws2_ptr, y_ptr, w_ptr, sorted_ptr, block_slot_ptr,
                    num_post_ptr, n_pairs, H, I, max_m_blocks, stride_hm, stride_hs, stride_w2e, stride_w2n,
                    stride_s2e, stride_s2n, stride_ym, out_ptr, cnt_ptr, BM, BN2, BK2, GROUP_M2, FP8, H_FP8, EVEN_K2,
                    True, SWAP2, TMA2, K)


@triton.jit
def _prefetch_down(w_ptr, block_slot_ptr, num_post_ptr, stride_we, n, q, nq, BM: tl.constexpr, LINE: tl.constexpr):
    """Program q of nq asks L2 for its share of each used row block's slot's ``n`` weight elements
    (contiguous from ``w_ptr + slot * stride_we``; LINE elements a 128-byte line). A slot with
    several row blocks is asked for again: harmless."""
    share = tl.cdiv(tl.cdiv(n, nq), LINE) * LINE  # whole lines
    lo = q * share
    hi = tl.minimum(lo + share, n)
    for b in range(0, tl.load(num_post_ptr) // BM):
        base = w_ptr + tl.load(block_slot_ptr + b).to(tl.int64) * stride_we
        for c in range(lo, hi, 1024 * LINE):
            prefetch_l2(base + tl.minimum(c + tl.arange(0, 1024) * LINE, hi - 1))


# SM limits of the occupancy check (sm_90: 64K registers, 228 KB shared memory of which 1 KB per
# block is reserved, 64 warps)
_SM_REGS, _SM_SMEM, _SM_WARPS = 65536, 233472, 64
_FITS: dict[tuple, int] = {}


def _programs(device: torch.device, work: int, key: tuple) -> int:
    """Programs of the launch: every one resident at once (the grid barrier needs it): one per SM
    until the kernel of ``key`` has run once, then ``MOE_DECODE_LAUNCH["per_sm"]`` per SM where
    its registers and shared memory allow that many; one under the CPU interpreter (which runs
    programs one after another)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    per_sm = min(MOE_DECODE_LAUNCH.get("per_sm", 1), _FITS.get((idx, *key), 1))
    return max(1, min(_SMS[idx] * per_sm, work))


def _note_fit(device: torch.device, key: tuple, compiled, num_warps: int) -> None:
    """Record how many programs of the launched kernel fit one SM (its registers, shared memory)."""
    if device.type != "cuda" or compiled is None or not hasattr(compiled, "n_regs"):
        return
    idx = device.index if device.index is not None else torch.cuda.current_device()
    regs = -(-max(1, compiled.n_regs) // 8) * 8 * 32 * num_warps
    smem = compiled.metadata.shared + 1024
    fit = min(_SM_REGS // regs, _SM_SMEM // smem, _SM_WARPS // num_warps)
    try:  # the driver's own figure (it knows the shared memory carve-out), where it can be asked
        import ctypes

        n = ctypes.c_int(0)
        rc = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), ctypes.c_void_p(compiled.function), ctypes.c_int(32 * num_warps),
            ctypes.c_size_t(compiled.metadata.shared))
        fit = min(fit, n.value) if rc == 0 else 1
    except (OSError, AttributeError):
        fit = 1
    _FITS[(idx, *key)] = max(1, fit)


def moe_decode(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, k: int, renormalize: bool,
    w13: torch.Tensor, w2: torch.Tensor, slot_map: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    load: torch.Tensor | None = None, num_real: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for the whole MoE layer of T <= ``ROUTER_MATMUL_TOKENS_CAP`` tokens whose experts
    all live here with one replica each. x [T, H] (bf16), gate_weight [E, H], bias [E] or None,
    w13/w2 (and block-FP8 scales) as for ``fused_moe``, slot_map [E] int64 (expert -> slot), x_fp8
    (required with FP8 weights): x quantized per row and 128 columns; load/num_real as for
    ``route_topk``. -> (out [T, H], weights [T, k] x.dtype, ids [T, k], slots [T, k]): what
    ``route_logits_topk(..., pair_sort=)`` then ``fused_moe(..., pair_sort=, all_local=True)``
    return, bit for bit."""
    if x.dim() != 2 or gate_weight.dim() != 2 or gate_weight.shape[1] != x.shape[1] or gate_weight.dtype != x.dtype:
        raise ValueError(f"x must be [T, H] and gate_weight [E, H] of x's dtype; got {list(x.shape)} {x.dtype}, "
                         f"{list(gate_weight.shape)} {gate_weight.dtype}")
    t, h = x.shape
    e = gate_weight.shape[0]
    if t > ROUTER_MATMUL_TOKENS_CAP or e % _EB:
        raise ValueError(f"moe_decode takes at most {ROUTER_MATMUL_TOKENS_CAP} tokens and a multiple of {_EB} "
                         f"experts; got {t} tokens, {e} experts")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != e):
        raise ValueError(f"bias must be [{e}], got {list(bias.shape)}")
    slots_dummy = torch.empty((t, k), dtype=torch.int64, device=x.device)
    fp8 = _check(x, slots_dummy, w13, w2, w13_scale, w2_scale)
    if fp8 and x_fp8 is None:
        raise ValueError("moe_decode with block-FP8 experts takes x quantized (x_fp8)")
    s_local, i2, _ = w13.shape
    i = i2 // 2
    n_pairs = t * k
    cfg = get_config(n_pairs, fp8)
    sort = new_pair_sort(n_pairs, s_local, fp8, x.device, cfg)
    (weights, ids, slots), tail, flags = _tail_args(t, e, k, renormalize, x.device, x.dtype, slot_map, load, num_real,
                                                    sort, ROUTER_MATMUL_TOKENS_CAP)
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t == 0:
        return out, weights, ids, slots
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate_weight = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    ks = _router_k_slice(h)
    ksplit = triton.cdiv(h, ks)
    part = torch.empty((ksplit, t, e), dtype=torch.float32, device=x.device)

    c1, c2 = cfg["gemm1"], cfg["gemm2"]
    bk1 = FP8_BLOCK if fp8 else c1["BK"]
    bk2 = FP8_BLOCK if fp8 else c2["BK"]
    desc1 = _weight_desc(w13, c1, fp8, i, bk1)
    desc2 = _weight_desc(w2, c2, fp8, h, bk2)
    h_fp8 = fp8 and c1["BN"] == FP8_BLOCK
    if fp8:
        xq, xs = x_fp8
        if (xq.shape != x.shape or xq.dtype != torch.float8_e4m3fn or xq.stride(-1) != 1
                or xs.shape != (t, h // FP8_BLOCK) or xs.dtype != torch.float32):
            raise ValueError(f"x_fp8 must be (float8_e4m3fn {list(x.shape)}, float32 [{t}, {h // FP8_BLOCK}])")
        ws13, ws2 = w13_scale, w2_scale
    else:
        xq, xs, ws13, ws2 = x, x, w13, w2  # xs, ws13, ws2: dummy pointers
    hbuf = torch.empty((n_pairs, i), dtype=torch.float8_e4m3fn if h_fp8 else x.dtype, device=x.device)
    hs = torch.empty((n_pairs, i // FP8_BLOCK), dtype=torch.float32, device=x.device) if h_fp8 else hbuf
    y = torch.empty((n_pairs, h), dtype=x.dtype, device=x.device)
    n_sum = t * triton.cdiv(h, c2["BN"])
    counters = arrival_counters(x.device, n_sum + 1)
    sync_cnt, sync_gen = grid_sync_words(x.device)
    mb = sort.max_blocks
    work = max(triton.cdiv(t, _BT) * (e // _EB) * ksplit, mb * triton.cdiv(i, c1["BN"]), mb * triton.cdiv(h, c2["BN"]))
    launch = {"num_warps": MOE_DECODE_LAUNCH["num_warps"], "num_stages": MOE_DECODE_LAUNCH["num_stages"]}
    key = (fp8, t <= 16, json.dumps(cfg, sort_keys=True), tuple(launch.values()))
    compiled = _moe_decode_kernel[(_programs(x.device, work, key),)](
        x, gate_weight, bias if bias is not None else x, part, counters[n_sum:], t, e, h, x.stride(0),
        gate_weight.stride(0), *tail,
        xq, xs, w13, desc1, ws13, hbuf, hs, w2, desc2, ws2, y, out, counters, sync_cnt, sync_gen, n_pairs, i, mb,
        xq.stride(0), xs.stride(0) if fp8 else 0, w13.stride(0), w13.stride(1), ws13.stride(0) if fp8 else 0,
        ws13.stride(1) if fp8 else 0, hbuf.stride(0), hs.stride(0) if h_fp8 else 0, w2.stride(0), w2.stride(1),
        ws2.stride(0) if fp8 else 0, ws2.stride(1) if fp8 else 0, y.stride(0),
        BT=_BT, EB=_EB, KS=ks, KSPLIT=ksplit, HAS_BIAS=bias is not None,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", K=flags["K"], K_PAD=flags["K_PAD"],
        E_PAD=flags["E_PAD"], BR=16 if t <= 16 else ROUTER_MATMUL_TOKENS_CAP, RENORM=renormalize,
        COUNT=flags["COUNT"], REAL_PTR=flags["REAL_PTR"], BM=flags["BM"], S_PAD=flags["S_PAD"],
        J_PAD=flags["J_PAD"], FP8=fp8, H_FP8=h_fp8, BN1=c1["BN"], BK1=bk1, GROUP_M1=c1["GROUP_M"],
        EVEN_K1=h % bk1 == 0, SWAP1=c1.get("SWAP", False), TMA1=desc1 is not None, BN2=c2["BN"], BK2=bk2,
        GROUP_M2=c2["GROUP_M"], EVEN_K2=i % bk2 == 0, SWAP2=c2.get("SWAP", False), TMA2=desc2 is not None,
        USE_PDL=pdl_args(x.device)["USE_PDL"], PREFETCH_DOWN=MOE_DECODE_LAUNCH["prefetch_down"],
        BACKOFF=MOE_DECODE_LAUNCH["backoff"], LINE2=128 // w2.element_size(),
        launch_pdl=pdl_args(x.device)["launch_pdl"], **launch)
    _note_fit(x.device, key, compiled, launch["num_warps"])
    return out, weights, ids, slots
