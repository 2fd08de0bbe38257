"""Build a model from a Hugging Face checkpoint folder (no transformers model objects)."""

from __future__ import annotations

import torch

from eplb.model.checkpoint import CheckpointReader
from eplb.model.config import ModelConfig, load_config
from eplb.model.moe import MoELayer
from eplb.model.transformer import Attention, DecoderLayer, DenseMLP, MoEForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load_attention(attn: Attention, r: CheckpointReader, p: str, cfg: ModelConfig) -> None:
    h, d = cfg.hidden_size, cfg.head_dim
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    a = f"{p}.self_attn"
    attn.qkv.data.copy_(torch.cat([
        r.get(f"{a}.q_proj.weight", [nq, h]), r.get(f"{a}.k_proj.weight", [nkv, h]),
        r.get(f"{a}.v_proj.weight", [nkv, h]),
    ]))
    attn.o.data.copy_(r.get(f"{a}.o_proj.weight", [h, nq]))
    if cfg.attention_bias:
        attn.qkv_bias.data.copy_(torch.cat([
            r.get(f"{a}.q_proj.bias", [nq]), r.get(f"{a}.k_proj.bias", [nkv]), r.get(f"{a}.v_proj.bias", [nkv]),
        ]))
        if r.has(f"{a}.o_proj.bias"):
            attn.o_bias.data.copy_(r.get(f"{a}.o_proj.bias", [h]))
        else:
            attn.o_bias.data.zero_()
    if cfg.qk_norm == "head":
        attn.q_norm.data.copy_(r.get(f"{a}.q_norm.weight", [d]))
        attn.k_norm.data.copy_(r.get(f"{a}.k_norm.weight", [d]))
    elif cfg.qk_norm == "full":
        attn.q_norm.data.copy_(r.get(f"{a}.q_norm.weight", [nq]))
        attn.k_norm.data.copy_(r.get(f"{a}.k_norm.weight", [nkv]))


def load_model(
    path: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    ep_rank: int = 0, ep_size: int = 1, phy2log: torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[MoEForCausalLM, ModelConfig]:
    """Load ``path`` into a :class:`MoEForCausalLM`; with EP, only this rank's slots.

    phy2log [L_moe, P] (None = identity, P = E). Errors (ValueError) name the missing or
    mis-shaped tensor or config key.
    """
    dt = resolve_dtype(dtype)
    cfg = load_config(path)
    if torch.device(device).type == "cuda":
        # cuDNN's SDPA re-plans for every new key length, i.e. every decode step (measured ~30 ms
        # per layer per step on an H100); the flash / memory-efficient kernels have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, ep_size={ep_size}), got {ep_rank}")
    n_moe, e = cfg.num_moe_layers, cfg.num_experts
    if phy2log is None:
        phy2log = torch.arange(e).repeat(n_moe, 1)
    phy2log = torch.as_tensor(phy2log).long().cpu()
    if phy2log.dim() != 2 or phy2log.shape[0] != n_moe:
        raise ValueError(f"phy2log must have shape [{n_moe}, P], got {list(phy2log.shape)}")
    if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= e):
        raise ValueError(f"phy2log values must be logical experts in [0, {e})")
    r = CheckpointReader(path, dtype=dt, config=cfg)
    h = cfg.hidden_size
    layers: list[DecoderLayer] = []
    with torch.no_grad():
        for li in range(cfg.num_layers):
            p = f"model.layers.{li}"
            if li in cfg.moe_layers:
                mi = cfg.moe_layers.index(li)
                mlp = MoELayer(
                    hidden_size=h, intermediate_size=cfg.moe_intermediate_size, num_experts=e,
                    top_k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob, phy2log=phy2log[mi],
                    ep_rank=ep_rank, ep_size=ep_size, dtype=dt, device=device, layer_idx=li, moe_idx=mi,
                )
                mlp.gate_weight.data.copy_(r.router_weight(li))
                for local, slot in enumerate(range(mlp.slot_start, mlp.slot_end)):
                    t = r.expert_tensors(mi, int(phy2log[mi, slot]))
                    mlp.w13.data[local].copy_(t["w13"])
                    mlp.w2.data[local].copy_(t["w2"])
            else:
                mlp = DenseMLP(h, cfg.intermediate_size, dt, device)
                i = cfg.intermediate_size
                mlp.w13.data.copy_(torch.cat([
                    r.get(f"{p}.mlp.gate_proj.weight", [i, h]), r.get(f"{p}.mlp.up_proj.weight", [i, h])
                ]))
                mlp.w2.data.copy_(r.get(f"{p}.mlp.down_proj.weight", [h, i]))
            layer = DecoderLayer(cfg, mlp, dt, device)
            layer.input_norm.data.copy_(r.get(f"{p}.input_layernorm.weight", [h]))
            layer.post_norm.data.copy_(r.get(f"{p}.post_attention_layernorm.weight", [h]))
            _load_attention(layer.attn, r, p, cfg)
            layers.append(layer)
        model = MoEForCausalLM(cfg, layers, dt, device, max_len or cfg.max_position_embeddings)
        model.embed.data.copy_(r.get("model.embed_tokens.weight", [cfg.vocab_size, h]))
        model.norm.data.copy_(r.get("model.norm.weight", [h]))
        if not cfg.tie_word_embeddings:
            model.lm_head.data.copy_(r.get("lm_head.weight", [cfg.vocab_size, h]))
    model.eval()
    return model, cfg
