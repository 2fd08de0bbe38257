"""Build a model from a Hugging Face checkpoint folder (no transformers model objects)."""

from __future__ import annotations

import logging

import torch

from eplb.model.checkpoint import CheckpointReader
from eplb.model.config import ModelConfig, load_config
from eplb.model.dummy import RouterSkew, RouterTrace, init_dummy_weights, install_router_skew
from eplb.model.moe import MoELayer
from eplb.model.transformer import Attention, DecoderLayer, DenseMLP, MoEForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# load-time weight formats (vLLM's --quantization names); None = every weight in the compute dtype
QUANTIZATIONS = ("fp8",)
# --load-format values (vLLM's names): "auto" reads the safetensors, "dummy" makes random weights
LOAD_FORMATS = ("auto", "dummy")

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_quantization(
    quantization: str | None, device: str | torch.device, dtype: torch.dtype, cfg: ModelConfig | None = None,
) -> str | None:
    """Validate the ``quantization`` load option (ValueError naming the field); returns it.

    "fp8" keeps the block-FP8 weights of an FP8 checkpoint in FP8 for the Triton kernels
    (fused MoE and :func:`eplb.kernels.fp8_linear`), so it needs a CUDA device of compute
    capability >= 8.9 (FP8 tensor cores), triton, bfloat16 activations, 128x128 weight blocks and
    every quantized linear's dims divisible by 128."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, got {quantization!r} "
                         "(or 'none' to dequantize)")
    from eplb.kernels import HAS_TRITON

    dev = torch.device(device)
    if dev.type != "cuda" or not HAS_TRITON or not torch.cuda.is_available():
        raise ValueError(
            f"quantization={quantization!r} needs a CUDA device and triton (the FP8 weights run only "
            f"in the Triton kernels); got device {str(dev)!r}, triton {'present' if HAS_TRITON else 'missing'}")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        raise ValueError(f"quantization={quantization!r} needs FP8 tensor cores (compute capability >= 8.9), "
                         f"got {torch.cuda.get_device_capability(dev)}")
    if dtype != torch.bfloat16:
        raise ValueError(f"quantization={quantization!r} needs dtype bfloat16, got {dtype}")
    if cfg is not None:
        if cfg.fp8_block_size != [128, 128]:
            raise ValueError(
                f"quantization={quantization!r} needs a block-FP8 checkpoint (config.json "
                f"quantization_config with weight_block_size [128, 128]), got {cfg.fp8_block_size}")
        dims = {"hidden_size": cfg.hidden_size, "num_attention_heads * head_dim": cfg.num_heads * cfg.head_dim,
                "num_key_value_heads * head_dim": cfg.num_kv_heads * cfg.head_dim}
        if cfg.moe_layers:
            dims["moe_intermediate_size"] = cfg.moe_intermediate_size
        if len(cfg.moe_layers) < cfg.num_layers:
            dims["intermediate_size"] = cfg.intermediate_size
        bad = {k: v for k, v in dims.items() if v % 128}
        if bad:
            raise ValueError(f"quantization={quantization!r} needs these dims divisible by 128: {bad}")
    return quantization


def _load_attention(attn: Attention, r: CheckpointReader, p: str, cfg: ModelConfig) -> None:
    h, d = cfg.hidden_size, cfg.head_dim
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    a = f"{p}.self_attn"
    qkv = [(f"{a}.q_proj.weight", [nq, h]), (f"{a}.k_proj.weight", [nkv, h]), (f"{a}.v_proj.weight", [nkv, h])]
    if attn.qkv_scale is not None:
        # block-FP8: q, k and v are each a whole number of 128-row blocks, so their scales stack too
        parts = [r.get_fp8(n, shape) for n, shape in qkv]
        attn.qkv.data.copy_(torch.cat([q for q, _ in parts]))
        attn.qkv_scale.data.copy_(torch.cat([s for _, s in parts]))
        q, s = r.get_fp8(f"{a}.o_proj.weight", [h, nq])
        attn.o.data.copy_(q)
        attn.o_scale.data.copy_(s)
    else:
        attn.qkv.data.copy_(torch.cat([r.get(n, shape) for n, shape in qkv]))
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


def resolve_quantization(
    quantization: str | None, device: str | torch.device, dtype: torch.dtype, cfg: ModelConfig,
) -> str | None:
    """The weight format to load, as vLLM picks it: None (the default) follows the checkpoint --
    a block-FP8 one ([128, 128] blocks) keeps its weights in FP8 wherever the FP8 kernels run
    (CUDA of compute capability >= 8.9, triton, bfloat16) and is dequantized to ``dtype``
    elsewhere (CPU included); "fp8" insists on FP8 (ValueError when it cannot run); "none" always
    dequantizes. Returns "fp8" or None."""
    if quantization == "none":
        return None
    if quantization is not None:
        return check_quantization(quantization, device, dtype, cfg)
    if cfg.fp8_block_size is None:
        return None
    try:
        return check_quantization("fp8", device, dtype, cfg)
    except ValueError as exc:
        log.info("block-FP8 checkpoint dequantized to %s: %s", dtype, exc)
        return None


def build_model(
    cfg: ModelConfig, *, dtype: torch.dtype, device: str | torch.device, ep_rank: int, ep_size: int,
    phy2log: torch.Tensor, max_len: int, quantization: str | None,
) -> MoEForCausalLM:
    """The model's modules with uninitialised tensors (this rank's expert slots only)."""
    h = cfg.hidden_size
    layers: list[DecoderLayer] = []
    for li in range(cfg.num_layers):
        if li in cfg.moe_layers:
            mi = cfg.moe_layers.index(li)
            mlp: torch.nn.Module = MoELayer(
                hidden_size=h, intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
                top_k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob, phy2log=phy2log[mi],
                ep_rank=ep_rank, ep_size=ep_size, dtype=dtype, device=device, layer_idx=li, moe_idx=mi,
                quantization=quantization,
            )
        else:
            mlp = DenseMLP(h, cfg.intermediate_size, dtype, device, quantization=quantization)
        layers.append(DecoderLayer(cfg, mlp, dtype, device, quantization=quantization))
    return MoEForCausalLM(cfg, layers, dtype, device, max_len)


def _load_checkpoint(model: MoEForCausalLM, r: CheckpointReader, cfg: ModelConfig, fp8: bool) -> None:
    """Copy every tensor of the checkpoint into ``model`` (this rank's expert slots only)."""
    h = cfg.hidden_size
    for li, layer in enumerate(model.layers):
        p = f"model.layers.{li}"
        mlp = layer.mlp
        if isinstance(mlp, MoELayer):
            mlp.gate_weight.data.copy_(r.router_weight(li))
            dst = mlp.expert_tensors()  # w13, w2 (+ w13_scale, w2_scale with FP8)
            phy2log = mlp.phy2log.tolist()
            for local, slot in enumerate(range(mlp.slot_start, mlp.slot_end)):
                for k, v in r.expert_tensors(mlp.moe_idx, phy2log[slot], fp8=fp8).items():
                    dst[k][local].copy_(v)
        else:
            i = cfg.intermediate_size
            gu = [(f"{p}.mlp.gate_proj.weight", [i, h]), (f"{p}.mlp.up_proj.weight", [i, h])]
            down = (f"{p}.mlp.down_proj.weight", [h, i])
            if mlp.w13_scale is not None:
                parts = [r.get_fp8(n, shape) for n, shape in gu]
                mlp.w13.data.copy_(torch.cat([q for q, _ in parts]))
                mlp.w13_scale.data.copy_(torch.cat([s for _, s in parts]))
                q, s = r.get_fp8(*down)
                mlp.w2.data.copy_(q)
                mlp.w2_scale.data.copy_(s)
            else:
                mlp.w13.data.copy_(torch.cat([r.get(n, shape) for n, shape in gu]))
                mlp.w2.data.copy_(r.get(*down))
        layer.input_norm.data.copy_(r.get(f"{p}.input_layernorm.weight", [h]))
        layer.post_norm.data.copy_(r.get(f"{p}.post_attention_layernorm.weight", [h]))
        _load_attention(layer.attn, r, p, cfg)
    model.embed.data.copy_(r.get("model.embed_tokens.weight", [cfg.vocab_size, h]))
    model.norm.data.copy_(r.get("model.norm.weight", [h]))
    if not cfg.tie_word_embeddings:
        model.lm_head.data.copy_(r.get("lm_head.weight", [cfg.vocab_size, h]))


def load_model(
    path: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    ep_rank: int = 0, ep_size: int = 1, phy2log: torch.Tensor | None = None,
    max_len: int | None = None, quantization: str | None = None, load_format: str = "auto",
    seed: int = 0, router_skew: RouterSkew | RouterTrace | None = None,
) -> tuple[MoEForCausalLM, ModelConfig]:
    """Load ``path`` into a :class:`MoEForCausalLM`; with EP, only this rank's slots.

    phy2log [L_moe, P] (None = identity, P = E). ``quantization``: see
    :func:`resolve_quantization` (None: FP8 kernels for a block-FP8 checkpoint where they run,
    "fp8": insist, "none": dequantize to ``dtype``); kept in FP8 are the expert, attention and
    dense-MLP weights with their scales (embeddings, lm_head, router and norms stay in ``dtype``).
    ``load_format``: "auto" reads the safetensors; "dummy" makes random weights of the config's
    shapes on the device (:mod:`eplb.model.dummy`, seeded by ``seed``), optionally with a skewed
    router (``router_skew``: a Zipf window or a replayed trace; dummy only). Errors (ValueError)
    name the missing or mis-shaped tensor, config key or bad argument.
    """
    dt = resolve_dtype(dtype)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if router_skew is not None and load_format != "dummy":
        name = "dummy_router_trace" if isinstance(router_skew, RouterTrace) else "dummy_router_skew"
        raise ValueError(f"{name} needs load_format='dummy' (it biases random routers only)")
    if quantization not in (None, "none"):
        check_quantization(quantization, device, dt)  # the cheap checks before reading the folder
    cfg = load_config(path)
    quantization = resolve_quantization(quantization, device, dt, cfg)
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
    reader = None if load_format == "dummy" else CheckpointReader(path, dtype=dt, config=cfg)
    with torch.no_grad():
        model = build_model(cfg, dtype=dt, device=device, ep_rank=ep_rank, ep_size=ep_size, phy2log=phy2log,
                            max_len=max_len or cfg.max_position_embeddings, quantization=quantization)
        if reader is None:
            init_dummy_weights(model, seed=seed)
            if router_skew is not None:
                install_router_skew(model, router_skew)
        else:
            _load_checkpoint(model, reader, cfg, fp8=quantization == "fp8")
    model.eval()
    return model, cfg
