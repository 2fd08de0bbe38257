"""Tiny random checkpoints (a few MB, any of our families), written with transformers'
``save_pretrained``: what the tests and the CPU benches run on; nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

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


def tiny_config(arch: str = "qwen3_moe", **overrides: Any) -> PretrainedConfig:
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
) -> PreTrainedModel:
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
