"""Test-only helpers for the model tests: the transformers reference, empty KV caches, and the
relative logit error of one flattened prefill against the reference run per prompt."""

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
