"""Dev: does the FP8 expert GEMM lose read rate to its weight layout?

The decode-size FP8 expert GEMMs (SWAP tiles: [BN, 128] weight rows x [128, BM] activations) read
each K step as BN separate 128-byte row pieces, 2 KB apart (a row of H = 2048 e4m3 bytes); bf16
tiles of the same shape read 256-byte pieces and run at 95-100% of the read rate, FP8 at 80-90%.
This streams Qwen3-30B-A3B's gate/up weights of all 128 experts ([128, 1536, 2048] e4m3, 403 MB,
8x the L2) through the same pipelined dot three ways and reports GB/s against a >= 1 GiB
reduction read measured in the same run:

  row      the checkpoint layout [E, N, K], K step 128 (what the kernel does now);
  row256   the same layout, K step 256 (256-byte row pieces);
  tile     pre-tiled [E, N/BN, K/128, BN, 128]: each K step one contiguous BN x 128 block;
  tma      the checkpoint layout through the bulk tensor copy engine (tensor descriptor);
  tma_persistP  the same with a persistent grid of P programs per SM walking the tiles.

    python scripts/dev/bench_tile_layout.py [--out F]
"""
import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import gpu  # noqa: E402

E, N, K, BM = 128, 1536, 2048, 16


@triton.jit
def _stream_kernel(w_ptr, a_ptr, out_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr, TILED: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    nt = tl.program_id(1)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, 16)
    if TILED:
        base = w_ptr + ((e * (N // BN) + nt) * (K // BK)) * (BN * BK)
        w_ptrs = base + rn[:, None] * BK + rk[None, :]
        step = BN * BK
    else:
        w_ptrs = w_ptr + e * N * K + (nt * BN + rn)[:, None].to(tl.int64) * K + rk[None, :]
        step = BK
    a_ptrs = a_ptr + rk[:, None] * 16 + rm[None, :]
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    for _ in range(0, K // BK):
        w = tl.load(w_ptrs)
        a = tl.load(a_ptrs)
        acc += tl.dot(w, a)
        w_ptrs += step
        a_ptrs += BK * 16
    tl.store(out_ptr + (e * N + nt * BN + rn)[:, None] * 16 + rm[None, :], acc)


@triton.jit
def _stream_tma_kernel(w_desc, a_ptr, out_ptr, N, K, n_tiles, BN: tl.constexpr, BK: tl.constexpr,
                       PERSISTENT: tl.constexpr):
    """The row layout through the bulk tensor copy engine: w_desc views w as [E * N, K] with
    [BN, BK] boxes. PERSISTENT: a grid of a few programs per SM walks the tiles."""
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BK)
    step = tl.num_programs(0) if PERSISTENT else 1
    last = n_tiles if PERSISTENT else tl.program_id(0) + 1
    for tile in range(tl.program_id(0), last, step):
        row0 = tile * BN
        a_ptrs = a_ptr + rk[:, None] * 16 + rm[None, :]
        acc = tl.zeros((BN, 16), dtype=tl.float32)
        for kb in range(0, K // BK):
            w = w_desc.load([row0, kb * BK])
            a = tl.load(a_ptrs)
            acc += tl.dot(w, a)
            a_ptrs += BK * 16
        rn = row0 + tl.arange(0, BN)
        tl.store(out_ptr + rn[:, None].to(tl.int64) * 16 + rm[None, :], acc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    read = gpu.ceilings()["reduction_read_GBps"]
    print(f"{torch.cuda.get_device_name()}: reduction read {read:.0f} GB/s", flush=True)
    w = torch.randn(E, N, K, device="cuda").div_(8).to(torch.float8_e4m3fn)
    a = torch.randn(K, 16, device="cuda").div_(8).to(torch.float8_e4m3fn)
    out = torch.empty(E, N, 16, device="cuda", dtype=torch.float32)
    rows = []
    ref = []  # the first result, which every other variant must match

    def measure(call, **cfg) -> None:
        """Time one variant, check its result against the first and record it (one row, one line)."""
        label = " ".join(f"{k}={v}" for k, v in cfg.items())
        try:
            sec = gpu.timed(call, reps=30)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  {label}: {type(exc).__name__} {exc}"[:300])
            return
        if not ref:
            ref.append(out.clone())
        same = bool(torch.allclose(out, ref[0], rtol=1e-3, atol=1e-2))
        gbps = w.numel() / sec / 1e9
        rows.append({**cfg, "us": sec * 1e6, "GBps": gbps, "of_read": gbps / read, "same_result": same})
        print(f"  {label}: {sec * 1e6:7.1f} us {gbps:6.0f} GB/s ({gbps / read:.2f} of read)"
              f"{'' if same else ' RESULT DIFFERS'}", flush=True)

    for bn in (64, 128):
        tiled = w.view(E, N // bn, bn, K // 128, 128).permute(0, 1, 3, 2, 4).contiguous()
        for layout, bk, src in (("row", 128, w), ("row256", 256, w), ("tile", 128, tiled)):
            for stages, warps in itertools.product((3, 4, 5), (4, 8)):
                def call(bn=bn, bk=bk, src=src, layout=layout, stages=stages, warps=warps):
                    _stream_kernel[(E, N // bn)](src, a, out, N, K, BN=bn, BK=bk, TILED=layout == "tile",
                                                 num_stages=stages, num_warps=warps)
                measure(call, BN=bn, layout=layout, stages=stages, warps=warps)
    from triton.tools.tensor_descriptor import TensorDescriptor

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w2d = w.view(E * N, K)
    for bn in (64, 128):
        desc = TensorDescriptor.from_tensor(w2d, [bn, 128])
        n_tiles = E * N // bn
        for layout, grid in (("tma", n_tiles), ("tma_persist1", sms), ("tma_persist2", 2 * sms),
                             ("tma_persist4", 4 * sms)):
            for stages, warps in itertools.product((2, 3, 4), (4, 8)):
                def call(desc=desc, bn=bn, grid=grid, n_tiles=n_tiles, layout=layout, stages=stages,
                         warps=warps):
                    _stream_tma_kernel[(min(grid, n_tiles),)](
                        desc, a, out, N, K, n_tiles, BN=bn, BK=128, PERSISTENT=layout != "tma",
                        num_stages=stages, num_warps=warps)
                measure(call, BN=bn, layout=layout, stages=stages, warps=warps)
    for layout in dict.fromkeys(r["layout"] for r in rows):  # in the order measured
        best = max((r for r in rows if r["layout"] == layout), key=lambda r: r["GBps"])
        print(f"best {layout}: {best['of_read']:.3f} of read ({best})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "reduction_read_GBps": read, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
