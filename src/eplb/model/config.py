"""Model configuration read from a Hugging Face ``config.json``.

One dataclass covers every supported family; the family-specific bits (where the
q/k norms sit, whether the router renormalises) are plain fields so the layers
need no per-family branches beyond reading them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# architectures value -> family key
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
}


@dataclass
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: str  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    clip_qkv: float | None
    moe_layers: list[int]  # decoder layer indices that hold a MoE block
    eos_token_ids: list[int] = field(default_factory=list)
    # block-FP8: [block_out, block_in] or None for unquantized checkpoints
    fp8_block_size: list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)


def _get(cfg: dict[str, Any], key: str, *alternatives: str, default: Any = ...) -> Any:
    for k in (key, *alternatives):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise ValueError(f"config.json is missing key {key!r}")
    return default


def _eos_ids(cfg: dict[str, Any], path: str) -> list[int]:
    ids: Any = cfg.get("eos_token_id")
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        if gen.get("eos_token_id") is not None:
            ids = gen["eos_token_id"]
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) else list(ids)
    vocab = int(cfg.get("vocab_size", 0))
    return [int(i) for i in ids if 0 <= int(i) < vocab]


def load_config(path: str) -> ModelConfig:
    """Parse ``path/config.json``; ValueError names a missing key or an unsupported value."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"no config.json in {path!r}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    archs = cfg.get("architectures")
    if not archs:
        raise ValueError("config.json is missing key 'architectures'")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    hidden = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    num_layers = int(_get(cfg, "num_hidden_layers"))
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported; allowed: default")
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if rope_theta is None:
        raise ValueError("config.json is missing key 'rope_theta' (or rope_parameters.rope_theta)")

    if family == "mixtral":
        num_experts = int(_get(cfg, "num_local_experts", "num_experts"))
        moe_inter = int(_get(cfg, "intermediate_size"))
        norm_topk = True
        moe_layers = list(range(num_layers))
        qk_norm = "none"
    else:
        num_experts = int(_get(cfg, "num_experts", "num_local_experts"))
        norm_topk = bool(_get(cfg, "norm_topk_prob", default=False))
        qk_norm = "head" if family == "qwen3_moe" else "full"
        if family == "qwen3_moe":
            moe_inter = int(_get(cfg, "moe_intermediate_size"))
            step = int(_get(cfg, "decoder_sparse_step", default=1))
            mlp_only = set(_get(cfg, "mlp_only_layers", default=[]))
            moe_layers = [
                i for i in range(num_layers)
                if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
            ]
        else:
            moe_inter = int(_get(cfg, "intermediate_size"))
            moe_layers = list(range(num_layers))

    fp8 = None
    q = cfg.get("quantization_config")
    if q:
        method = q.get("quant_method")
        if method != "fp8":
            raise ValueError(f"quantization_config.quant_method {method!r} is not supported; allowed: fp8")
        fp8 = q.get("weight_block_size")
        if not (isinstance(fp8, list) and len(fp8) == 2 and all(isinstance(b, int) and b > 0 for b in fp8)):
            raise ValueError(
                f"quantization_config.weight_block_size must be two positive ints, got {fp8!r}"
            )

    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=int(_get(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(head_dim),
        num_experts=num_experts,
        top_k=int(_get(cfg, "num_experts_per_tok")),
        moe_intermediate_size=moe_inter,
        intermediate_size=int(_get(cfg, "intermediate_size", default=moe_inter)),
        norm_topk_prob=norm_topk,
        rms_norm_eps=float(_get(cfg, "rms_norm_eps")),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(_get(cfg, "max_position_embeddings", default=4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=qk_norm,
        clip_qkv=cfg.get("clip_qkv"),
        moe_layers=moe_layers,
        eos_token_ids=_eos_ids(cfg, path),
        fp8_block_size=fp8,
        raw=cfg,
    )
