"""Runtime benchmark: forward-step time of DP+EP ranks, steady and while EPLB rebalances, sync
against async; and the rebalance transfers' bandwidth and messages per layer against raw
point-to-point (NCCL on GPUs, gloo on CPU).

Run: .venv/bin/python bench/runtime.py [--ranks 4] [--quick]            (CPU, gloo)
     python3 bench/runtime.py --device cuda --ranks 2 [--layers 8]      (GPUs, NCCL)
Writes bench/results/runtime.json (CPU) or runtime-<gpu>.json and prints a table.

On GPUs the model is Qwen3-30B-A3B's shape (configs/Qwen3-30B-A3B, bf16, ``--layers`` of its 48
layers) with random weights made on the device (``load_format="dummy"``) and skewed, drifting
routers (``dummy_router_skew``), so EPLB has real imbalance to fix and each expert is 9.4 MB.
The same call measures NCCL send/recv between the two GPUs (both directions at once, as a
rebalance does) at the per-layer message size the rebalances moved, and at 9.4 MB and 64 MB
(on CPU: gloo send/recv between two processes at the per-layer size).

One group of spawned ranks runs three scenarios on the same requests (a random Qwen3-MoE with
experts big enough that moving them takes time: 8 layers, hidden 256, 16 experts, expert
intermediate 512, float32, 4 redundant slots):
- ``off``: EPLB off; every step is "steady" (the baseline, measured in the same run);
- ``sync``: EPLB sync every ``step_interval`` steps; the step whose boundary ran the rebalance
  carries the whole transfer;
- ``async``: EPLB async; steps that ran while a rebalance was in flight are "during async".
A step's time is one iteration of rank 0's loop that ran a forward: the per-step all-reduce,
any EPLB work at that boundary, and the forward (which waits for the slowest rank in its
collectives). Ratios compare against the steady steps of the ``off`` scenario.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from machine import cpu_model, device_name  # bench/machine.py (the script's folder is on sys.path)

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.engine.sampling import SamplingParams  # noqa: E402
from eplb.model.tiny import make_tiny_checkpoint  # noqa: E402
from eplb.runtime.dp_offline import Scenario, run_scenarios  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(hidden_size=256, num_hidden_layers=8, num_experts=16, moe_intermediate_size=512,
             head_dim=32, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512)
ENGINE = {"dtype": "float32", "max_model_len": 320, "max_num_seqs": 8}


def requests(num: int, max_tokens: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(3, 128, (8 + (i * 5) % 24,), generator=g).tolist(),
             SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for i in range(num)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


WARMUP_STEPS = 8  # first steps of a run pay kernel compilation and allocator growth


def summarize(log: list[tuple[float, str]], phase: str) -> dict:
    ms = [s * 1e3 for s, p in log[WARMUP_STEPS:] if p == phase]
    return {"steps": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
            "max_ms": max(ms) if ms else float("nan"),
            "mean_ms": statistics.mean(ms) if ms else float("nan")}


def _p2p_worker(rank: int, port: int, sizes: list[int], q, backend: str) -> None:
    import time

    import torch.distributed as dist

    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2,
                            **({"device_id": torch.device("cuda", rank)} if cuda else {}))
    device = "cuda" if cuda else "cpu"
    peer = 1 - rank
    out = {}
    for size in sizes:
        send = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)
        times = []
        for i in range(25 if cuda else 8):
            dist.barrier()
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer),
                                             dist.P2POp(dist.irecv, recv, peer)]):
                w.wait()
            if cuda:
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = time.perf_counter() - t0
            if i >= (5 if cuda else 2):  # warm-up first
                times.append(seconds)
        out[size] = size / statistics.median(times) / 1e9  # one direction, GB/s
    q.put((rank, out))
    dist.destroy_process_group()


def p2p_bandwidth(sizes: list[int], backend: str = "nccl") -> dict[int, float]:
    """Send/recv GB/s per direction between ranks 0 and 1 (GPU 0 and 1 on NCCL), both
    directions at once, one message each way: the raw rate a layer transfer is held to."""
    import torch.multiprocessing as mp

    from eplb.parallel.groups import find_free_port, set_nccl_env

    set_nccl_env()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_p2p_worker, args=(r, port, sizes, q, backend))
             for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    return {s: min(res[0][s], res[1][s]) for s in sizes}


def gpu_model_dir(tmp: str, layers: int) -> str:
    """configs/Qwen3-30B-A3B with ``layers`` layers (weights: --load-format dummy)."""
    import shutil

    src = Path(__file__).resolve().parents[1] / "configs" / "Qwen3-30B-A3B"
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    cfg = json.loads((Path(tmp) / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (Path(tmp) / "config.json").write_text(json.dumps(cfg))
    return tmp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--layers", type=int, default=8, help="GPU: Qwen3-30B-A3B layers to build")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = args.ranks
    gpu = args.device == "cuda"
    max_tokens = 60 if args.quick else 240
    interval = 20 if args.quick else 40
    if gpu:
        reqs = [(torch.randint(0, 150000, (256,), generator=torch.Generator().manual_seed(i))
                 .tolist(), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
                for i in range(32 * g)]
        engine = {"dtype": "bfloat16", "device": "cuda", "max_model_len": 512,
                  "max_num_seqs": 64, "load_format": "dummy", "dummy_router_skew": 1.5,
                  "dummy_router_drift": 100}
    else:
        reqs = requests(4 * g, max_tokens)
        engine = ENGINE
    eplb = {"window_size": interval, "step_interval": interval, "num_redundant_experts": g,
            "policy": "deepseek"}
    scenarios = [
        Scenario("off", requests=reqs, record_steps=True),
        Scenario("sync", eplb={**eplb, "use_async": False}, requests=reqs, record_steps=True),
        Scenario("async", eplb={**eplb, "use_async": True}, requests=reqs, record_steps=True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if gpu:
            model_dir = gpu_model_dir(tmp, args.layers)
        else:
            make_tiny_checkpoint(tmp, "qwen3_moe", seed=0, tokenizer=True, **MODEL)
            model_dir = tmp
        res = run_scenarios(model_dir, g, scenarios, engine, timeout_s=1800)
    by = {sc.name: r for sc, r in zip(scenarios, res)}
    steady = summarize(by["off"][0]["step_log"], "steady")
    rows = {
        "steady (EPLB off)": steady,
        "steady (async run, between rebalances)": summarize(by["async"][0]["step_log"], "steady"),
        "during sync rebalance": summarize(by["sync"][0]["step_log"], "sync"),
        "during async rebalance": summarize(by["async"][0]["step_log"], "async"),
    }
    for row in rows.values():
        row["p50_vs_steady"] = row["p50_ms"] / steady["p50_ms"]
        row["p99_vs_steady"] = row["p99_ms"] / steady["p99_ms"]
    figures = {}
    for name in ("sync", "async"):
        st = by[name][0]["stats"]
        figures[name] = {k: st[k] for k in ("rebalances", "rebalances_failed", "copies_moved",
                                            "bytes_moved", "mean_rebalance_s", "steps",
                                            "balancedness_history")}
        figures[name]["steps_in_flight"] = [e["steps_in_flight"] for e in st["events"]]
        # transfers: bytes each rank received over the seconds its layer transfers took
        recv = [r["stats"]["transfer_bytes_received"] for r in by[name]]
        secs = [r["stats"]["transfer_seconds"] for r in by[name]]
        layers = max(st["layers_committed"], 1)
        figures[name]["transfer_gb_per_s"] = (
            min(b / s / 1e9 for b, s in zip(recv, secs)) if all(secs) else None)
        # per layer (median over ranks' layers): a one-off cost cannot hide in a sum
        per_layer = [t[0] / t[1] / 1e9 for r in by[name] for t in r["stats"]["layer_transfers"]
                     if t[1] > 0 and t[0] > 0]
        figures[name]["transfer_gb_per_s_median_layer"] = (
            statistics.median(per_layer) if per_layer else None)
        figures[name]["bytes_received_per_layer_per_rank"] = int(min(recv) / layers)
        # P2P messages (sends + receives) a rank posted per layer; the design is one send and
        # one receive per peer, so with 2 ranks anything above 2 is a regression
        msgs = [t[2] for r in by[name] for t in r["stats"]["layer_transfers"] if len(t) > 2]
        figures[name]["messages_per_layer_per_rank_median"] = (
            statistics.median(msgs) if msgs else None)
        figures[name]["messages_per_layer_per_rank_max"] = max(msgs) if msgs else None
    # the raw point-to-point rate of one message each way, at the size a layer moved, measured
    # in the same call (NCCL between GPU 0 and 1; gloo on CPU, where it is loopback TCP)
    per_layer = max(1, min(f["bytes_received_per_layer_per_rank"] for f in figures.values()))
    sizes = sorted({per_layer, 9_437_184, 64 * 2**20}) if gpu else [per_layer]
    p2p = p2p_bandwidth(sizes, "nccl" if gpu else "gloo")
    for f in figures.values():
        ref = p2p[per_layer]
        f["p2p_gb_per_s_same_size"] = ref
        f["transfer_vs_p2p"] = (f["transfer_gb_per_s"] / ref
                                if f["transfer_gb_per_s"] else None)
        f["median_layer_vs_p2p"] = (f["transfer_gb_per_s_median_layer"] / ref
                                    if f["transfer_gb_per_s_median_layer"] else None)
    tokens_equal = all(
        {k: v for r in by[n] for k, v in r["tokens"].items()}
        == {k: v for r in by["off"] for k, v in r["tokens"].items()} for n in ("sync", "async"))
    async_ratio = rows["during async rebalance"]["p99_vs_steady"]
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": sys.version.split()[0], "load_avg_at_end": os.getloadavg()}
    if gpu:
        machine["gpu"] = device_name("cuda")
        machine["gpus"] = torch.cuda.device_count()
    result = {
        "benchmark": "runtime",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "setup": {"ranks": g, "backend": "allgather_reducescatter",
                  "model": (f"Qwen3-30B-A3B shape, {args.layers} layers, dummy weights, "
                            "router skew 1.5 drifting every 100 steps") if gpu else MODEL,
                  "engine": engine, "requests": len(reqs), "max_tokens": max_tokens,
                  "eplb": eplb, "threads_per_rank": 1},
        "step_time": rows,
        "rebalances": figures,
        "tokens_equal_across_scenarios": tokens_equal,
        "target": {"async_p99_within_1.25x_steady": async_ratio <= 1.25,
                   "async_p99_vs_steady": async_ratio},
    }
    result["p2p_gb_per_s"] = {str(k): v for k, v in p2p.items()}
    result["target"]["async_transfers_at_least_half_p2p"] = (
        (figures["async"]["transfer_vs_p2p"] or 0) >= 0.5)
    out = args.out or str(RESULTS / (
        "runtime.json" if not gpu else
        f"runtime-{machine['gpu'].lower().replace(' ', '-')}x{g}.json"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{g} ranks, {machine.get('gpu', 'CPU ' + cpu_model())}, torch {torch.__version__}")
    print(f"{'phase':42s} {'steps':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 x':>6s} {'p99 x':>6s}")
    for name, row in rows.items():
        print(f"{name:42s} {row['steps']:6d} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
              f"{row['p50_vs_steady']:6.2f} {row['p99_vs_steady']:6.2f}")
    for name, f in figures.items():
        print(f"{name}: {f['rebalances']} rebalances, {f['copies_moved']} copies, "
              f"{f['bytes_moved'] / 2**20:.1f} MiB, mean {f['mean_rebalance_s'] * 1e3:.0f} ms, "
              f"steps in flight {f['steps_in_flight']}, transfers "
              f"{f['transfer_gb_per_s'] or 0:.2f} GB/s "
              f"({f['transfer_vs_p2p'] or 0:.2f}x {'NCCL' if gpu else 'gloo'} P2P of the same "
              f"size, {f['p2p_gb_per_s_same_size']:.2f} GB/s; median layer "
              f"{f['transfer_gb_per_s_median_layer'] or 0:.2f} GB/s = "
              f"{f['median_layer_vs_p2p'] or 0:.2f}x), P2P messages per layer and rank: "
              f"median {f['messages_per_layer_per_rank_median']}, "
              f"max {f['messages_per_layer_per_rank_max']}")
    print(f"tokens equal across scenarios: {tokens_equal}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
