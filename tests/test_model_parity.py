"""Our model against transformers on tiny random checkpoints made here (float32)."""

from __future__ import annotations

import pytest
import torch

from eplb.engine import LLM, SamplingParams
from eplb.model import AttentionMetadata, load_model
from eplb.model.tiny import make_tiny_checkpoint
from model_helpers import empty_kv_cache, prefill_rel_errors

torch.set_num_threads(1)
ARCHS = ["qwen3_moe", "mixtral", "olmoe"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    ref = make_tiny_checkpoint(path, request.param, seed=1)
    return path, ref


def test_logits_match_transformers_for_a_batch_of_different_lengths(ckpt):
    path, ref = ckpt
    model, cfg = load_model(path, dtype="float32", max_len=64)
    # all prompts in one flattened forward, each compared with transformers run alone
    errors = prefill_rel_errors(model, cfg, ref, [1, 7, 23, 40])
    assert all(e < 1e-4 for e in errors), errors


def test_chunked_prefill_then_decode_matches_transformers(ckpt):
    path, ref = ckpt
    model, cfg = load_model(path, dtype="float32", max_len=64)
    ids = torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(1))
    kv = empty_kv_cache(cfg, 3, 64)
    got = []
    with torch.no_grad():
        # slot 2; chunks of 11 and 9 tokens, then 10 single-token decodes
        for start, n in ((0, 11), (11, 9)):
            meta = AttentionMetadata.build([], [(2, start, n)])
            got.append(model.compute_logits(model(ids[start : start + n], meta, kv)))
        for pos in range(20, 30):
            meta = AttentionMetadata.build([(2, pos)], [])
            got.append(model.compute_logits(model(ids[pos : pos + 1], meta, kv)))
        want = ref(ids[None]).logits[0]
    assert rel_err(torch.cat(got), want) < 1e-4


def test_greedy_32_tokens_equal_transformers_generate(ckpt):
    path, ref = ckpt
    llm = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=4)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3] * 17, [40, 41]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        want = ref.generate(
            torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p):].tolist()
        assert o.token_ids == want
        assert o.finish_reason == "length"


def test_same_output_alone_and_in_a_batch(ckpt):
    path, _ = ckpt
    # a small token budget forces chunked prefill mixed with other requests' decodes
    llm = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=3, max_num_batched_tokens=8)
    target = list(range(20, 45))
    for params in (SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)):
        alone = llm.generate([target], params)[0]
        others = [[9] * n for n in (3, 12, 30, 5, 2)]
        batch = llm.generate(others[:2] + [target] + others[2:], params)[2]
        assert batch.token_ids == alone.token_ids


def test_bfloat16_runs_close_to_float32(tmp_path):
    ref = make_tiny_checkpoint(str(tmp_path), "qwen3_moe", seed=2, tokenizer=False, dtype=torch.bfloat16)
    model, cfg = load_model(str(tmp_path), dtype="bfloat16", max_len=32)
    assert model.moe_layers()[0].w13.dtype == torch.bfloat16
    ids = torch.arange(3, 23)
    shape = (1, cfg.num_kv_heads, 32, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
          for _ in range(cfg.num_layers)]
    with torch.no_grad():
        ours = model.compute_logits(model(ids, AttentionMetadata.build([], [(0, 0, 20)]), kv)).float()
        want = ref.to(torch.bfloat16).float()(ids[None]).logits[0]  # bf16-rounded weights, fp32 math
    assert rel_err(ours, want) < 5e-2
