"""End-to-end part of the GPU benchmark: our engine vs transformers ``generate``, same random
weights with Qwen3-30B-A3B's shapes and fewer layers.

python bench/gpu_e2e.py [--layers 8] [--out DIR] [--tiny]   (--tiny: a few-MB model, CPU smoke test)
Decode tokens/s at batch 1, 32 and 128 (prompts of 16 tokens, greedy, ignore_eos); prefill
tokens/s of one 8192-token prompt. Ours: bf16 with CUDA graphs (and eager, for reference) and
block-FP8 (the same weights quantized to 128x128 blocks, kept in FP8); transformers runs
``generate`` with ``_experts_implementation="grouped_mm"``. Writes gpu_e2e-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

BATCHES = [1, 32, 128]
PROMPT = 16


def qwen3_30b_config(layers: int, tiny: bool):
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=128, norm_topk_prob=True,
                              max_position_embeddings=1024, eos_token_id=1, pad_token_id=0,
                              tie_word_embeddings=False)
    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, rope_theta=1e6,
                          max_position_embeddings=40960, eos_token_id=151645, pad_token_id=151643,
                          tie_word_embeddings=False)


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def ours_decode(core, batch: int, steps: int, vocab: int, dev) -> float:
    from eplb.engine import SamplingParams

    g = torch.Generator().manual_seed(batch)
    for b in range(batch):
        core.add_request(f"d{batch}-{b}", torch.randint(2, vocab, (PROMPT,), generator=g).tolist(),
                         SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    core.step()  # prefill of all prompts (batch * 16 tokens fit one step)
    for _ in range(3):
        core.step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    while core.has_unfinished_requests():
        for b in range(batch):
            core.abort_request(f"d{batch}-{b}")
    return batch / dt


def ours_prefill(core, n: int, vocab: int, dev) -> float:
    from eplb.engine import SamplingParams

    ids = torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(7)).tolist()
    times = []
    for rep in range(3):
        core.add_request(f"p{rep}", ids, SamplingParams(max_tokens=1, temperature=0.0))
        sync(dev)
        t0 = time.perf_counter()
        while core.has_unfinished_requests():
            core.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return n / min(times[1:])


@torch.no_grad()
def hf_decode(model, batch: int, steps: int, vocab: int, dev) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, vocab, (batch, PROMPT), generator=g).to(dev)
    mask = torch.ones_like(ids)

    def gen(n):
        sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(dev)
        return time.perf_counter() - t0

    gen(2)
    short = min(gen(4), gen(4))
    long_ = min(gen(4 + steps), gen(4 + steps))
    return batch * steps / (long_ - short)


@torch.no_grad()
def hf_prefill(model, n: int, vocab: int, dev) -> float:
    """transformers' forward over one prompt (hidden states + the last row's logits). On CUDA the
    best of two runs: SDPA with cuDNN attention first in priority, and without cuDNN (flash)."""
    ids = torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(7)).to(dev)

    def best(reps=3):
        times = []
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            h = model.model(ids).last_hidden_state
            model.lm_head(h[:, -1])
            sync(dev)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    t = best()
    if torch.device(dev).type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            t = min(t, best())
    return n / t


def profile(core, batch: int, vocab: int, dev) -> int:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from eplb.engine import SamplingParams

    for b in range(batch):
        core.add_request(f"q{b}", list(range(2, 2 + PROMPT)),
                         SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for _ in range(4):
        core.step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(5):
        core.step()
    sync(dev)
    print(f"decode step at batch {batch}: {(time.perf_counter() - t0) / 5 * 1e3:.2f} ms", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(5):
            core.step()
        sync(dev)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    if dev == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cudnn-sdpa", action="store_true", help="leave torch's cuDNN attention backend on")
    ap.add_argument("--no-fp8", action="store_true", help="skip the block-FP8 engine")
    ap.add_argument("--profile", type=int, default=0,
                    help="only profile 5 decode steps of our engine at this batch size and exit")


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        ap = argparse.ArgumentParser()
        add_arguments(ap)
        ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
        args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not args.cudnn_sdpa:
        # torch's cuDNN attention backend builds a new cuDNN graph for every new key length: the
        # engine's masked decode attention then costs ~30 ms per layer per step (profiled on the
        # device's H100). Both sides run with it off unless --cudnn-sdpa.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if dev == "cpu" and not args.tiny:
        print("bench/gpu_e2e.py needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    from transformers import Qwen3MoeForCausalLM

    from eplb.engine.core import EngineCore

    cfg = qwen3_30b_config(args.layers, args.tiny)
    cfg._experts_implementation = "grouped_mm"
    prefill = min(args.prefill, 512) if args.tiny else args.prefill
    torch.manual_seed(0)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        hf = Qwen3MoeForCausalLM(cfg).eval()
    torch.set_default_dtype(old)
    print(f"built transformers model in {time.perf_counter() - t0:.0f}s", flush=True)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__, "layers": cfg.num_hidden_layers,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "note": "ours: decode in CUDA graphs (bf16_eager: --enforce-eager); fp8: block-FP8 weights kept "
                   "in FP8; transformers generate with grouped_mm experts (prefill: best of cuDNN and flash SDPA); "
                   + ("cuDNN SDPA on" if args.cudnn_sdpa else "cuDNN SDPA backend off for both"),
           "decode_tok_s": {}, "prefill_tok_s": {}}
    vocab = cfg.vocab_size
    engines = [("bf16", None, False), ("bf16_eager", None, True)]
    if not args.no_fp8 and dev == "cuda":
        engines.append(("fp8", "fp8", False))
    theirs_decode = {b: hf_decode(hf, b, args.steps, vocab, dev) for b in BATCHES}
    theirs_prefill = hf_prefill(hf, prefill, vocab, dev)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        hf.save_pretrained(d)
        print(f"saved checkpoint in {time.perf_counter() - t0:.0f}s", flush=True)
        fp8_dir = os.path.join(d, "fp8")
        if len(engines) == 3:
            from eplb.model.quantize import quantize_checkpoint_fp8

            quantize_checkpoint_fp8(d, fp8_dir)
        for name, quant, eager in engines:
            t0 = time.perf_counter()
            core = EngineCore(fp8_dir if quant else d, dtype="bfloat16", device=dev,
                              max_model_len=prefill + 64, max_num_seqs=max(BATCHES),
                              max_num_batched_tokens=max(prefill, 4096), enforce_eager=eager,
                              **({"quantization": quant} if quant else {}))
            print(f"loaded our engine ({name}) in {time.perf_counter() - t0:.0f}s", flush=True)
            if args.profile:
                return profile(core, args.profile, vocab, dev)
            for b in BATCHES:
                ours = ours_decode(core, b, args.steps, vocab, dev)
                row = res["decode_tok_s"].setdefault(str(b), {"transformers": theirs_decode[b]})
                row[f"ours_{name}"] = ours
                row[f"ratio_{name}"] = ours / theirs_decode[b]
                print(f"  decode batch {b:4d}: ours {name:10s} {ours:9.1f} tok/s  transformers "
                      f"{theirs_decode[b]:9.1f} tok/s  x{ours / theirs_decode[b]:.2f}", flush=True)
            if not eager:
                ours = ours_prefill(core, prefill, vocab, dev)
                row = res["prefill_tok_s"].setdefault(str(prefill), {"transformers": theirs_prefill})
                row[f"ours_{name}"] = ours
                row[f"ratio_{name}"] = ours / theirs_prefill
                print(f"  prefill {prefill} tokens: ours {name:10s} {ours:9.0f} tok/s  transformers "
                      f"{theirs_prefill:9.0f} tok/s  x{ours / theirs_prefill:.2f}", flush=True)
            del core
            torch.cuda.empty_cache() if dev == "cuda" else None
    if "fp8" in {e[0] for e in engines}:
        b32 = res["decode_tok_s"]["32"]
        res["fp8_over_bf16_decode_b32"] = b32["ours_fp8"] / b32["ours_bf16"]
        print(f"  FP8 / bf16 decode at batch 32: x{res['fp8_over_bf16_decode_b32']:.2f}")
    slug = res["device"].replace("NVIDIA ", "").replace(" ", "-").lower()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_e2e-{slug}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
