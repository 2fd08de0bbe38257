"""Tiny random checkpoints for tests, written with transformers' ``save_pretrained``.

Used by this repo's tests (engine, runtime, server); nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "is", "of", "in", "it",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "plus",
    "minus", "equals", "answer", "question", "user", "assistant", "hello", "world", "red",
    "blue", "green", "big", "small", "up", "down", ":",
]
SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_config(arch: str = "qwen3_moe", **overrides: Any):
    """A transformers config of a few-MB model. vocab 128, hidden 64, 4 heads, 2 kv heads."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    base: dict[str, Any] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, eos_token_id=1, pad_token_id=0, bos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "qwen3_moe":
        base.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                    norm_topk_prob=True)
        cls = Qwen3MoeConfig
    elif arch == "mixtral":
        base.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
        cls = MixtralConfig
    elif arch == "olmoe":
        base.update(num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False)
        cls = OlmoeConfig
    else:
        raise ValueError(f"arch must be one of qwen3_moe, mixtral, olmoe, got {arch!r}")
    base.update(overrides)
    return cls(**base)


def _model_class(arch: str):
    from transformers import MixtralForCausalLM, OlmoeForCausalLM, Qwen3MoeForCausalLM

    return {"qwen3_moe": Qwen3MoeForCausalLM, "mixtral": MixtralForCausalLM, "olmoe": OlmoeForCausalLM}[arch]


def save_tiny_tokenizer(path: str) -> None:
    """A word-level tokenizer.json (+ tokenizer_config.json with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in WORDS:
        vocab[w] = len(vocab)
    for i in range(128 - len(vocab)):
        vocab[f"x{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)


def make_tiny_checkpoint(
    path: str, arch: str = "qwen3_moe", *, seed: int = 0, dtype: torch.dtype = torch.float32,
    tokenizer: bool = True, **overrides: Any,
):
    """Save a random model of family ``arch`` to ``path``; returns the transformers model (float32)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = _model_class(arch)(cfg).eval()
    os.makedirs(path, exist_ok=True)
    model.to(dtype).save_pretrained(path)
    model.float()
    if tokenizer:
        save_tiny_tokenizer(path)
    return model


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
    import json
    import shutil

    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.torch import save_file

    from eplb.kernels.reference import FP8_BLOCK, quantize_block_fp8

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
