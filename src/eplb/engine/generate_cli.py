"""`eplb generate MODEL --prompt TEXT`: offline generation with the engine."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (Hugging Face layout)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--quantization", "-q", choices=("fp8", "none"), default=None,
                   help="default: a block-FP8 checkpoint runs the FP8 kernels where they can run "
                        "(CUDA sm >= 8.9, triton, bfloat16) and is dequantized elsewhere; fp8: insist; "
                        "none: always dequantize to --dtype")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="auto: read the safetensors; dummy: random weights of config.json's shapes")
    p.add_argument("--json", action="store_true", help="print {text, token_ids, finish_reason}")


def main(args: argparse.Namespace) -> int:
    from eplb.engine.llm import LLM
    from eplb.engine.sampling import SamplingParams
    from eplb.engine.tokenizer import apply_chat_template

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=args.stop,
        )
        llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  max_num_seqs=1, max_num_batched_tokens=2048, enforce_eager=args.enforce_eager,
                  quantization=args.quantization, load_format=args.load_format)
        if llm.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json (nor id_tokenizer.json)")
        if args.chat:
            prompt = apply_chat_template(llm.tokenizer, [{"role": "user", "content": args.prompt}])
        else:
            prompt = llm.tokenizer.encode(args.prompt)
        out = llm.generate([prompt], params)[0]
    except (ValueError, OSError) as exc:
        print(f"eplb generate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0
