"""Test-only helpers for the model tests: the transformers reference, empty KV caches, the
relative logit error of one flattened prefill against the reference run per prompt, a CPU
engine on the CUDA-graph path's static forward, and the tiny-checkpoint fixture."""

from __future__ import annotations

import torch


def load_reference(path: str):
    """transformers' model for ``path`` in float32 (the numerical reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def empty_kv_cache(cfg, slots: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed per-layer (k, v) caches [slots, kv_heads, max_len, head_dim] for direct forwards."""
    shape = (slots, cfg.num_kv_heads, max_len, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]


def prefill_rel_errors(model, cfg, ref, lengths: list[int], max_len: int = 64) -> list[float]:
    """Random prompts of ``lengths`` (seed 0) prefilled in ONE flattened forward of ``model``,
    against ``ref`` (transformers) run on each prompt alone: max relative logit error per prompt."""
    from eplb.model import AttentionMetadata

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    kv = empty_kv_cache(cfg, len(prompts), max_len)
    meta = AttentionMetadata.build([], [(i, 0, len(p)) for i, p in enumerate(prompts)])
    errors = []
    with torch.no_grad():
        ours = model.compute_logits(model(torch.cat(prompts), meta, kv))
        off = 0
        for p in prompts:
            want = ref(p[None]).logits[0]
            errors.append(float((ours[off : off + len(p)] - want).abs().max() / want.abs().max()))
            off += len(p)
    return errors


def run_to_completion(engine, reqs) -> dict:
    """Add ``(request_id, prompt_ids, SamplingParams)`` requests to an ``EngineCore``, step until
    none is left; the final ``RequestOutput`` of each, by request id."""
    for rid, ids, p in reqs:
        engine.add_request(rid, ids, p)
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return final


def static_path_core(path: str, *, max_tokens: int | None = None, **engine):
    """A float32 CPU ``EngineCore`` (max_model_len 64, 6 slots, 64 tokens a step unless
    ``engine`` says otherwise) whose graph-path steps run the graph runner's padded static
    forward eagerly: the CPU twin of the CUDA-graph path. ``max_tokens``: its largest step."""
    from eplb.engine import EngineCore
    from eplb.engine.cuda_graphs import DecodeGraphs

    kw = {"dtype": "float32", "device": "cpu", "max_model_len": 64, "max_num_seqs": 6,
          "max_num_batched_tokens": 64, "enforce_eager": True, **engine}
    core = EngineCore(path, **kw)
    core._graphs = DecodeGraphs(core.model, core.kv.layers, max_batch=core.kv.num_slots,
                                scratch_slot=core.kv.scratch_slot, device=core.device, capture=False,
                                max_tokens=max_tokens)
    core._graphs_checked = True
    return core


def tiny_checkpoint_fixture(seed: int):
    """A module-scoped pytest fixture giving the folder of a tiny qwen3_moe checkpoint (random
    weights from ``seed``), written once per test module: ``path = tiny_checkpoint_fixture(11)``."""
    import pytest

    from eplb.model.tiny import make_tiny_checkpoint

    @pytest.fixture(scope="module")
    def path(tmp_path_factory):
        p = str(tmp_path_factory.mktemp("tiny"))
        make_tiny_checkpoint(p, "qwen3_moe", seed=seed)
        return p

    return path
