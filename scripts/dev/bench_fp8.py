"""Dev bench on the device: decode time per step at batch 32 of a random Qwen3-30B-A3B-shaped model
(LAYERS=2 by default), block-FP8 weights kept in FP8 (quantization="fp8") vs bf16, CUDA graphs and
eager; plus the per-op split at 32 tokens (MoE layer, qkv/o projections) replayed in CUDA graphs.

The FP8 checkpoint is the bf16 one run through eplb.model.testing.quantize_checkpoint_fp8, so both
engines hold the same (random) weights up to FP8 rounding. Not a bench of record; prints only.
"""
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from gpu_e2e import qwen3_30b_config  # noqa: E402

from eplb.engine import SamplingParams  # noqa: E402
from eplb.engine.core import EngineCore  # noqa: E402
from eplb.model.testing import quantize_checkpoint_fp8  # noqa: E402

LAYERS = int(os.environ.get("LAYERS", "2"))
BATCH = int(os.environ.get("BATCH", "32"))
STEPS = int(os.environ.get("STEPS", "30"))


def graph_ms(fn, reps: int = 20) -> float:
    """ms per call of fn, replayed from one CUDA graph of ``reps`` calls (no launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (5 * reps) * 1e3


def decode_ms(core: EngineCore, vocab: int, eager: bool) -> float:
    core.enforce_eager = eager
    core._graphs_checked = False  # dev script: re-decide graphs for this mode
    core._graphs = None
    g = torch.Generator().manual_seed(0)
    for b in range(BATCH):
        core.add_request(f"r{b}", torch.randint(2, vocab, (16,), generator=g).tolist(),
                         SamplingParams(max_tokens=STEPS + 8, temperature=0.0, ignore_eos=True))
    core.step()  # prefill
    for _ in range(3):  # graph capture / warm-up
        core.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        core.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / STEPS * 1e3
    for b in range(BATCH):
        core.abort_request(f"r{b}")
    while core.has_unfinished_requests():
        core.step()
    return dt


def op_split(core: EngineCore) -> dict[str, float]:
    """Graph-replayed ms of one MoE layer and the qkv / o projections at BATCH tokens."""
    from eplb.model.transformer import linear

    layer = core.model.layers[0]
    h = core.config.hidden_size
    x = torch.randn(BATCH, h, dtype=torch.bfloat16, device="cuda")
    a = layer.attn
    xo = torch.randn(BATCH, a.nq * a.d, dtype=torch.bfloat16, device="cuda")
    return {
        "moe_layer": graph_ms(lambda: layer.mlp(x)),
        "qkv": graph_ms(lambda: linear(x, a.qkv, a.qkv_bias, a.qkv_scale)),
        "o": graph_ms(lambda: linear(xo, a.o, a.o_bias, a.o_scale)),
    }


def main() -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = qwen3_30b_config(LAYERS, False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        from transformers import Qwen3MoeForCausalLM

        hf = Qwen3MoeForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    print(f"{torch.cuda.get_device_name()}  {LAYERS} layers of Qwen3-30B-A3B shape, batch {BATCH}", flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        hf.save_pretrained(d)
        del hf
        torch.cuda.empty_cache()
        fp8_dir = os.path.join(d, "fp8")
        quantize_checkpoint_fp8(d, fp8_dir, device="cuda")
        print(f"saved + quantized in {time.perf_counter() - t0:.0f}s", flush=True)
        for name, path, quant in (("bf16", d, None), ("fp8", fp8_dir, "fp8")):
            t0 = time.perf_counter()
            core = EngineCore(path, dtype="bfloat16", device="cuda", max_model_len=256,
                              max_num_seqs=BATCH, max_num_batched_tokens=1024, quantization=quant)
            wbytes = sum(t.numel() * t.element_size() for l in core.model.moe_layers()
                         for t in l.expert_tensors().values())
            print(f"{name}: loaded in {time.perf_counter() - t0:.0f}s, expert bytes {wbytes / 2**20:.0f} MiB",
                  flush=True)
            res[name] = {"graph": decode_ms(core, cfg.vocab_size, eager=False),
                         "eager": decode_ms(core, cfg.vocab_size, eager=True)}
            try:
                res[name].update(op_split(core))
            except Exception as exc:  # noqa: BLE001 - the decode numbers above still count
                print(f"{name}: op split failed: {exc!r}", flush=True)
            print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res[name].items()), flush=True)
            del core
            torch.cuda.empty_cache()
    for k in res["bf16"].keys() & res["fp8"].keys():
        print(f"fp8/bf16 time {k}: x{res['fp8'][k] / res['bf16'][k]:.2f}")


if __name__ == "__main__":
    main()
