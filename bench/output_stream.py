"""Host cost of sending request outputs from a rank to the front, per engine step: the cumulative
``RequestOutput`` of every request pickled each step (before) against ``OutputDelta`` (what the
step added; eplb.runtime.output_stream).

    PYTHONPATH=src python bench/output_stream.py [--requests 32,256] [--prompt-len 512] [--steps 256]

For each number of concurrent requests: ``steps`` decode steps of one new token (and a word of
text) per request; per step, the bytes on the queue, the rank's time (build the message, pickle
it) and the front's (unpickle, and for deltas rebuild the cumulative outputs the server reads),
medians over the steps. Writes bench/results/output-stream.json.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

from machine import write_rows  # noqa: E402

from eplb.engine.core import RequestOutput  # noqa: E402
from eplb.runtime.messages import RankOutputs  # noqa: E402
from eplb.runtime.output_stream import DeltaDecoder, DeltaEncoder  # noqa: E402


def run(requests: int, prompt_len: int, steps: int, deltas: bool) -> dict:
    prompts = {f"cmpl-{i}-0": list(range(i, i + prompt_len)) for i in range(requests)}
    tokens = {rid: [] for rid in prompts}
    texts = dict.fromkeys(prompts, "")
    enc, dec = DeltaEncoder(), DeltaDecoder()
    for rid, p in prompts.items():
        dec.start(rid, p)
    nbytes, rank_ms, front_ms = [], [], []
    for n in range(steps):
        outs = []
        for rid in prompts:  # what EngineCore._sample builds each step (both ways)
            tokens[rid].append(n)
            texts[rid] += " w"
            outs.append(RequestOutput(rid, prompts[rid], list(tokens[rid]), texts[rid], False, None))
        t0 = time.perf_counter()
        msg = RankOutputs(0, [enc.encode(o) for o in outs] if deltas else outs)
        blob = pickle.dumps(msg)
        t1 = time.perf_counter()
        got = pickle.loads(blob)
        if deltas:
            got = [dec.apply(d) for d in got.outputs]
        t2 = time.perf_counter()
        nbytes.append(len(blob))
        rank_ms.append((t1 - t0) * 1e3)
        front_ms.append((t2 - t1) * 1e3)
    return {"bytes_per_step": statistics.median(nbytes), "rank_ms_per_step": statistics.median(rank_ms),
            "front_ms_per_step": statistics.median(front_ms)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", default="32,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "output-stream.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'requests':>8s} {'way':>10s} {'KB/step':>8s} {'rank ms':>8s} {'front ms':>9s}")
    for r in (int(v) for v in args.requests.split(",")):
        for way, deltas in (("cumulative", False), ("deltas", True)):
            res = run(r, args.prompt_len, args.steps, deltas)
            rows.append({"requests": r, "way": way, **res})
            print(f"{r:8d} {way:>10s} {res['bytes_per_step'] / 1e3:8.1f} {res['rank_ms_per_step']:8.3f} "
                  f"{res['front_ms_per_step']:9.3f}")
    write_rows(args.out, __doc__.strip().splitlines()[0],
               {"requests": args.requests, "prompt_len": args.prompt_len, "steps": args.steps}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
