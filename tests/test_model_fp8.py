"""Block-FP8 checkpoints: quantized here block by block (partial edge blocks), loaded, compared
with transformers run on the dequantized weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from eplb.model import CheckpointReader, load_model
from eplb.model.checkpoint import dequantize_block_fp8
from eplb.model.testing import load_reference, make_tiny_checkpoint, prefill_rel_errors

torch.set_num_threads(1)
BLOCK = 128
FP8_MAX = 448.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (fp8 [O, I], scale_inv float32 [ceil(O/128), ceil(I/128)])."""
    o, i = w.shape
    bo, bi = -(-o // BLOCK), -(-i // BLOCK)
    scale = torch.empty(bo, bi)
    q = torch.empty(o, i, dtype=torch.float8_e4m3fn)
    for r in range(bo):
        for c in range(bi):
            blk = w[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK]
            s = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[r, c] = s
            q[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _quantized(name: str) -> bool:
    return name.endswith("_proj.weight")  # attention and expert/MLP linears; not router/norms/embeddings


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = str(root / "src")
    # hidden 160 and expert intermediate 144: one full 128-block plus a partial one per dim
    make_tiny_checkpoint(src, "qwen3_moe", seed=11, tokenizer=False, hidden_size=160,
                         moe_intermediate_size=144, head_dim=40, num_attention_heads=4,
                         num_key_value_heads=2)
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    qsd, deq = {}, {}
    for k, v in sd.items():
        if _quantized(k):
            q, s = quantize(v)
            qsd[k], qsd[k[: -len("weight")] + "weight_scale_inv"] = q, s
            deq[k] = dequantize_block_fp8(q, s, [BLOCK, BLOCK])
        else:
            qsd[k] = deq[k] = v
    fp8_dir, deq_dir = root / "fp8", root / "deq"
    for d, tensors, c in ((fp8_dir, qsd, dict(cfg, quantization_config={
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK]})), (deq_dir, deq, cfg)):
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(c))
    return str(fp8_dir), str(deq_dir), qsd, cfg


def test_dequantize_handles_partial_blocks():
    w = torch.randn(200, 130)
    q, s = quantize(w)
    d = dequantize_block_fp8(q, s, [BLOCK, BLOCK])
    assert s.shape == (2, 2)
    # last row/col blocks (72 x 2) use their own scale
    torch.testing.assert_close(d[128:, 128:], q[128:, 128:].float() * s[1, 1])
    assert float((d - w).abs().max() / w.abs().max()) < 0.07  # e4m3 has 3 mantissa bits


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(fp8_ckpt):
    fp8_dir, deq_dir, _, _ = fp8_ckpt
    ref = load_reference(deq_dir)
    model, cfg = load_model(fp8_dir, dtype="float32", max_len=64)
    assert cfg.fp8_block_size == [128, 128]
    errors = prefill_rel_errors(model, cfg, ref, [9, 30])
    assert all(e < 1e-4 for e in errors), errors
    # expert tensors are stored dequantized in the compute dtype
    r = CheckpointReader(fp8_dir, dtype=torch.bfloat16)
    assert r.expert_tensors(0, 3)["w13"].dtype == torch.bfloat16


@pytest.mark.parametrize("case,expect", [
    ("bad_scale", r"model\.layers\.0\.mlp\.experts\.2\.down_proj\.weight_scale_inv has shape"),
    ("no_scale", r"model\.layers\.1\.self_attn\.q_proj\.weight_scale_inv"),
])
def test_fp8_scale_errors_name_the_tensor(fp8_ckpt, tmp_path, case, expect):
    fp8_dir, _, qsd, cfg = fp8_ckpt
    sd = dict(qsd)
    if case == "bad_scale":
        sd["model.layers.0.mlp.experts.2.down_proj.weight_scale_inv"] = torch.ones(1, 1)
    else:
        del sd["model.layers.1.self_attn.q_proj.weight_scale_inv"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(fp8_dir, "config.json")).read())
    with pytest.raises(ValueError, match=expect):
        load_model(str(tmp_path))
