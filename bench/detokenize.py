"""Host time of detokenization per engine step: the whole output re-decoded every step (before)
against the incremental window (eplb.engine.detokenizer), at serving-like concurrency.

    PYTHONPATH=src python bench/detokenize.py [--requests 64,256] [--steps 256]

For each tokenizer (the shipped model's byte-level BPE, and the id tokenizer of the full-size
configs) and each number of concurrent requests: ``steps`` decode steps of one new token per
request, text updated after each; milliseconds of host time per step (median of 3 runs; both
methods on the same ids in the same run). Writes bench/results/detokenize.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

from machine import write_rows  # noqa: E402

from eplb.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from eplb.engine.tokenizer import IdTokenizer, load_tokenizer  # noqa: E402
from eplb.resources import default_model_path  # noqa: E402


def per_step_ms(tokenizer, outputs: list[list[int]], incremental: bool) -> float:
    steps = len(outputs[0])
    detoks = [IncrementalDetokenizer(tokenizer) for _ in outputs]
    grown: list[list[int]] = [[] for _ in outputs]  # each request's output, one id per step
    t0 = time.perf_counter()
    for n in range(steps):
        for ids, d, out in zip(outputs, detoks, grown):
            out.append(ids[n])
            if incremental:
                d.update(out)
            else:
                tokenizer.decode(out, skip_special_tokens=True)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", default="64,256")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "detokenize.json"))
    args = ap.parse_args()
    rng = random.Random(0)
    toks = {"byte-level BPE (shipped model)": load_tokenizer(default_model_path()),
            "id tokenizer (full-size configs)": IdTokenizer(151936)}
    rows = []
    print(f"{'tokenizer':34s} {'requests':>8s} {'whole ms/step':>14s} {'window ms/step':>15s} {'ratio':>6s}")
    for name, tok in toks.items():
        vocab = len(tok)
        for r in (int(v) for v in args.requests.split(",")):
            outputs = [[rng.randrange(vocab) for _ in range(args.steps)] for _ in range(r)]
            whole = statistics.median(per_step_ms(tok, outputs, False) for _ in range(3))
            window = statistics.median(per_step_ms(tok, outputs, True) for _ in range(3))
            rows.append({"tokenizer": name, "requests": r, "steps": args.steps,
                         "whole_output_ms_per_step": whole, "window_ms_per_step": window,
                         "ratio": whole / window})
            print(f"{name:34s} {r:8d} {whole:14.3f} {window:15.3f} {whole / window:6.1f}")
    write_rows(args.out, __doc__.strip().splitlines()[0], {"requests": args.requests, "steps": args.steps}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
