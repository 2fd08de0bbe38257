"""Block-FP8 checkpoints from bf16 ones: ``quantize_checkpoint_fp8(src, dst)`` writes the layout of
Qwen/Qwen3-30B-A3B-FP8 (what ``load_model`` keeps in FP8 with ``quantization="fp8"``).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from eplb.kernels.reference import FP8_BLOCK, quantize_block_fp8


def _fp8_quantized_name(name: str, t: torch.Tensor) -> bool:
    """Which tensors an FP8 checkpoint (Qwen/Qwen3-30B-A3B-FP8 layout) stores in block-FP8: the
    2-D ``*_proj.weight`` linears of attention, experts and dense MLPs; not the router
    (``mlp.gate.weight``), norms, embeddings or lm_head."""
    return name.endswith("_proj.weight") and t.dim() == 2 and t.is_floating_point()


def quantize_checkpoint_fp8(src: str, dst: str, *, device: str | torch.device | None = None) -> None:
    """Write ``dst``: the HF checkpoint folder ``src`` (single file or sharded) with every
    ``*_proj.weight`` in block-FP8 as in Qwen/Qwen3-30B-A3B-FP8: ``weight`` float8_e4m3fn plus
    ``weight_scale_inv`` float32 per 128x128 block (partial edge blocks get their own scale), and
    ``quantization_config`` {quant_method "fp8", fmt "e4m3", activation_scheme "dynamic",
    weight_block_size [128, 128]} in config.json. Other tensors and files are copied unchanged.
    ``device``: where the quantization math runs (default: cuda when available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(dst, exist_ok=True)
    index_path = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    weight_map: dict[str, str] = {}
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(os.path.join(src, shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if not _fp8_quantized_name(name, t):
                    out[name] = t
                    continue
                o, i = t.shape
                # pad to whole blocks with zeros (they do not change a block's amax), crop after
                w = F.pad(t.to(device=device, dtype=torch.float32), (0, -i % FP8_BLOCK, 0, -o % FP8_BLOCK))
                q, s = quantize_block_fp8(w)
                out[name] = q[:o, :i].contiguous().cpu()
                out[name[: -len("weight")] + "weight_scale_inv"] = s.cpu()
        save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in out})
    if len(shards) > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    skip = {"config.json", "model.safetensors.index.json", *shards}
    for fname in os.listdir(src):
        full = os.path.join(src, fname)
        if fname not in skip and os.path.isfile(full):
            shutil.copy(full, os.path.join(dst, fname))
