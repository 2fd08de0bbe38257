"""`eplb eval gsm8k`: score an OpenAI-compatible server on GSM8K (or the synthetic set).

Arguments follow vLLM's ``tests/evals/gsm8k/gsm8k_eval.py``; see docs/eval.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from eplb.evals.gsm8k import DATASETS, EvalConfig, EvalError, resolve_data, run_eval, stderr_progress


def _add_gsm8k_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="http://127.0.0.1",
                   help="server address with scheme (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="server port (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="model name sent in requests (default: the first one /v1/models lists)")
    p.add_argument("--dataset", choices=DATASETS, default="gsm8k",
                   help="gsm8k: the public test set (downloaded once, cached); synthetic: the "
                        "repo's data/synthetic_gsm8k_*.jsonl (default: %(default)s)")
    p.add_argument("--data-path", default=None,
                   help="local GSM8K-format JSONL of questions (overrides --dataset)")
    p.add_argument("--shots-path", default=None,
                   help="JSONL whose first --num-shots records are the few-shot examples "
                        "(default: the dataset's train split)")
    p.add_argument("--num-questions", type=int, default=1319,
                   help="ask the first N questions (default: %(default)s)")
    p.add_argument("--num-shots", type=int, default=5, help="few-shot examples (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="max tokens per answer (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed sent with each request")
    p.add_argument("--concurrency", type=int, default=32,
                   help="requests in flight at once (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per request before it counts as failed (default: %(default)s)")
    p.add_argument("--save-results", default=None, help="write the result JSON here")
    p.add_argument("--save-outputs", default=None,
                   help="write every answer (text, prediction, label) as JSONL here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_task", metavar="TASK")
    _add_gsm8k_arguments(sub.add_parser("gsm8k", help="GSM8K few-shot accuracy",
                                        description="GSM8K few-shot accuracy via /v1/completions"))


def _fail(msg: str) -> int:
    print(f"eplb eval: error: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    if getattr(args, "eval_task", None) != "gsm8k":
        return _fail("choose a task: eplb eval gsm8k [options]")
    for name in ("num_questions", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_shots < 0:
        return _fail(f"--num-shots must be >= 0, got {args.num_shots}")
    if args.temperature < 0:
        return _fail(f"--temperature must be >= 0, got {args.temperature}")
    if not args.host.startswith(("http://", "https://")):
        return _fail(f"--host needs a scheme, e.g. http://{args.host}")
    try:
        shots, questions = resolve_data(args.dataset, args.data_path, args.shots_path, args.num_shots)
    except (ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    cfg = EvalConfig(
        base_url=f"{args.host.rstrip('/')}:{args.port}",
        model=args.model,
        num_questions=args.num_questions,
        num_shots=args.num_shots,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        concurrency=args.concurrency,
        api_key=args.api_key,
        request_timeout_s=args.timeout,
    )
    try:
        result = asyncio.run(run_eval(cfg, shots, questions,
                                      progress=None if args.quiet else stderr_progress()))
    except EvalError as exc:
        print(f"eplb eval: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eplb eval: interrupted", file=sys.stderr)
        return 130
    summary = result.summary()
    summary["dataset"] = "file:" + args.data_path if args.data_path else args.dataset
    if args.save_results:
        path = Path(args.save_results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    if args.save_outputs:
        path = Path(args.save_outputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for o in result.outputs:
                f.write(json.dumps(o) + "\n")
    print(result.one_line())
    return 0
