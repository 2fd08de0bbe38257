"""Decoder-only MoE transformer shared by Qwen3-MoE, Mixtral and OLMoE.

Family differences are config fields: ``qk_norm`` ("head": RMSNorm per head, Qwen3;
"full": over all heads, OLMoE; "none": Mixtral), ``clip_qkv``, ``norm_topk_prob`` and
which layers are MoE (the rest use a dense SwiGLU MLP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from eplb.kernels import HAS_TRITON
from eplb.model.attention import AttentionMetadata, attend, attend_fp8_out, sdpa_backends
from eplb.model.config import ModelConfig
from eplb.model.moe import MoELayer

if TYPE_CHECKING:
    from eplb.model.dummy import RouterSkewState, RouterTraceState

_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """F.linear, but float32 on CPU goes through oneDNN: x [N, in] @ weight[out, in].T.

    ``scale`` given: ``weight`` is block-FP8 (float8_e4m3fn) with ``weight_scale_inv`` [out/128,
    in/128], run by the Triton kernel :func:`eplb.kernels.fp8_linear` (CUDA only); ``x_fp8``: x
    already quantized for it (see :func:`rms_norm_fp8`).

    Why: at decode sizes (a few rows) MKL's sgemm runs one thread at ~8-15 GFLOP/s here,
    while oneDNN splits the output columns over the intra-op threads (lm_head at 8 rows:
    2.1 -> 1.0 ms on the 2-core bench machine). Results differ from MKL by float rounding only.
    """
    if scale is not None:
        from eplb.kernels import fp8_linear

        y = fp8_linear(x, weight, scale, x_fp8=x_fp8)
        return y if bias is None else y + bias
    if _onednn_linear is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
        return _onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# The fused Triton norm/RoPE kernels (eplb.kernels.norm_rope) replace the torch ops below on CUDA
# bf16/fp16 with the same rounding steps; False keeps the torch path (tests compare the two).
FUSED_NORM_ROPE = True
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_norm_rope = None


def _kernels(x: torch.Tensor):
    """The norm_rope kernel module when it applies to ``x`` (imported on first use), else None."""
    global _norm_rope
    if not (FUSED_NORM_ROPE and HAS_TRITON and x.is_cuda and x.dtype in _KERNEL_DTYPES):
        return None
    if _norm_rope is None:
        from eplb.kernels import norm_rope

        _norm_rope = norm_rope
    return _norm_rope


def _norm_kernel(x: torch.Tensor, weight: torch.Tensor):
    """The norm_rope kernel module when ``rms_norm_fused`` takes this x and weight, else None."""
    k = _kernels(x)
    if k is not None and x.dim() == 2 and x.stride(-1) == 1 and x.shape[-1] % 4 == 0 and weight.dtype == x.dtype:
        return k
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Matches transformers: normalise in float32, cast back, then scale.

    With ``residual``: ``(rms_norm(x + residual), x + residual)``, the decoder layer's residual
    add fused into the next norm (one launch on CUDA bf16/fp16; bit-identical to the torch ops).
    """
    k = _norm_kernel(x, weight)
    if k is not None:
        return k.rms_norm_fused(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
        return rms_norm(x, weight, eps), x
    if x.dtype == torch.float32:
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _linear_params(out_f: int, in_f: int, dtype: torch.dtype, device: torch.device | str,
                   quantization: str | None) -> tuple[nn.Parameter, nn.Parameter | None]:
    """(weight [out, in], scale): with quantization "fp8" the weight is float8_e4m3fn and scale
    its float32 weight_scale_inv [out/128, in/128] (run by fp8_linear); else scale is None."""
    if quantization == "fp8":
        return (_param(out_f, in_f, dtype=torch.float8_e4m3fn, device=device),
                _param(out_f // 128, in_f // 128, dtype=torch.float32, device=device))
    return _param(out_f, in_f, dtype=dtype, device=device), None


class Rope(nn.Module):
    """Default RoPE (rotate-half layout); cos/sin tables [max_len, D] in float32."""

    def __init__(self, head_dim: int, theta: float, max_len: int, device: torch.device | str) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D]."""
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 quantize: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """A decoder layer's norm: (out, residual stream, x_fp8), where the residual stream is
    x + residual (x itself when ``residual`` is None) and, with ``quantize`` (the next GEMM is
    block-FP8), x_fp8 is (q, scales), ``out`` quantized per row and 128 columns by the norm's own
    launch; None without ``quantize`` or where the fused kernel does not apply (the GEMM then
    quantizes)."""
    k = _norm_kernel(x, weight) if quantize and x.shape[-1] % 128 == 0 else None
    if k is not None:
        *normed, q, qs = k.rms_norm_fused(x, weight, eps, residual, fp8=True)
        return normed[0], normed[-1] if residual is not None else x, (q, qs)
    if residual is None:
        return rms_norm(x, weight, eps), x, None
    out, r = rms_norm(x, weight, eps, residual)
    return out, r, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 quantization: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.nq, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, d
        nqkv = (self.nq + 2 * self.nkv) * d
        # q, k, v projections fused into one matmul
        self.qkv, self.qkv_scale = _linear_params(nqkv, h, dtype, device, quantization)
        self.qkv_bias = _param(nqkv, dtype=dtype, device=device) if cfg.attention_bias else None
        self.o, self.o_scale = _linear_params(h, self.nq * d, dtype, device, quantization)
        self.o_bias = _param(h, dtype=dtype, device=device) if cfg.attention_bias else None
        if cfg.qk_norm == "head":
            self.q_norm = _param(d, dtype=dtype, device=device)
            self.k_norm = _param(d, dtype=dtype, device=device)
        elif cfg.qk_norm == "full":
            self.q_norm = _param(self.nq * d, dtype=dtype, device=device)
            self.k_norm = _param(self.nkv * d, dtype=dtype, device=device)
        self.scale = d**-0.5

    @property
    def fp8_input(self) -> bool:
        """The qkv projection is block-FP8 (it can take its input pre-quantized: ``x_fp8``)."""
        return self.qkv_scale is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv: tuple[torch.Tensor, torch.Tensor],
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        n = x.shape[0]
        qkv = linear(x, self.qkv, self.qkv_bias, self.qkv_scale, x_fp8=x_fp8)
        sq, skv = self.nq * self.d, self.nkv * self.d
        q, k, v = qkv[:, :sq], qkv[:, sq : sq + skv], qkv[:, sq + skv :]
        eps = self.cfg.rms_norm_eps
        if self.cfg.qk_norm != "full" and self.cfg.clip_qkv is None:
            # q and k heads side by side: one norm and one RoPE for both (per-element math
            # is the same as doing them apart; half the ops per layer)
            nh = self.nq + self.nkv
            kern = _kernels(qkv)
            written = False
            if kern is not None and self.d % 8 == 0:
                # per-head norm + RoPE in one Triton launch, same rounding steps as below; it
                # also writes k and v into the KV cache (two index_put launches fewer per layer)
                head = self.cfg.qk_norm == "head"
                written = n > 0 and kv[0].dtype == qkv.dtype and kv[0].stride(-1) == 1
                q, k, v = kern.qk_norm_rope(
                    qkv, self.q_norm if head else None, self.k_norm if head else None, cos, sin, None,
                    self.nq, self.nkv, self.d, eps, kv_cache=kv if written else None,
                    kv_slots=meta.token_slots, kv_positions=meta.positions)
            else:
                qk = qkv[:, : sq + skv].reshape(n, nh, self.d)
                if self.cfg.qk_norm == "head":
                    w = torch.cat([self.q_norm.expand(self.nq, self.d), self.k_norm.expand(self.nkv, self.d)])
                    qk = rms_norm(qk, w, eps)
                qk = Rope.apply(qk, cos, sin)
                q, k = qk[:, : self.nq], qk[:, self.nq :]
                v = qkv[:, sq + skv :].reshape(n, self.nkv, self.d)
            if self.o_scale is not None:  # block-FP8 o projection: take the output pre-quantized
                o, o_fp8 = attend_fp8_out(q, k, v, kv[0], kv[1], meta, self.scale, kv_written=written)
            else:
                o, o_fp8 = attend(q, k, v, kv[0], kv[1], meta, self.scale, kv_written=written), None
            return linear(o.reshape(n, sq), self.o, self.o_bias, self.o_scale, x_fp8=o_fp8)
        if self.cfg.qk_norm == "full":
            q, k = rms_norm(q, self.q_norm, eps), rms_norm(k, self.k_norm, eps)
        if self.cfg.clip_qkv is not None:
            c = self.cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.reshape(n, self.nq, self.d)
        k = k.reshape(n, self.nkv, self.d)
        v = v.reshape(n, self.nkv, self.d)
        if self.cfg.qk_norm == "head":
            q, k = rms_norm(q, self.q_norm, eps), rms_norm(k, self.k_norm, eps)
        q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        o = attend(q, k, v, kv[0], kv[1], meta, self.scale)
        return linear(o.reshape(n, sq), self.o, self.o_bias, self.o_scale)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device: torch.device | str,
                 quantization: str | None = None) -> None:
        super().__init__()
        self.inter = inter
        self.w13, self.w13_scale = _linear_params(2 * inter, hidden, dtype, device, quantization)
        self.w2, self.w2_scale = _linear_params(hidden, inter, dtype, device, quantization)

    @property
    def fp8_input(self) -> bool:
        """Block-FP8 weights: forward can take x pre-quantized (``x_fp8``)."""
        return self.w13_scale is not None

    def forward(self, x: torch.Tensor, num_real_tokens: int | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        gu = linear(x, self.w13, scale=self.w13_scale, x_fp8=x_fp8)
        return linear(F.silu(gu[:, : self.inter]) * gu[:, self.inter :], self.w2, scale=self.w2_scale)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module, dtype: torch.dtype, device: torch.device | str,
                 quantization: str | None = None) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.post_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.attn = Attention(cfg, dtype, device, quantization)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor],
                num_real_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H]: the previous layer's output (layer 0: the embeddings, residual None);
        residual [N, H]: the residual stream it is to be added to. Returns (mlp output, residual
        stream after attention): each residual add is left to the next norm, which fuses it (as
        vLLM does). Same values as ``x = x + attn(norm(x)); x + mlp(norm(x))``: adds commute."""
        h, residual, h_fp8 = rms_norm_fp8(x, self.input_norm, self.eps, residual, self.attn.fp8_input)
        h = self.attn(h, cos, sin, meta, kv, x_fp8=h_fp8)
        h, residual, h_fp8 = rms_norm_fp8(h, self.post_norm, self.eps, residual, self.mlp.fp8_input)
        return self.mlp(h, num_real_tokens, x_fp8=h_fp8), residual


class MoEForCausalLM(nn.Module):
    """forward(input_ids [N], meta, kv_caches) -> hidden [N, H]; compute_logits(h) -> [*, V]."""

    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer], dtype: torch.dtype,
                 device: torch.device | str, max_len: int) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(layers)
        self.norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = self.embed if cfg.tie_word_embeddings else _param(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device
        )
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, max_len, device)
        self.router_skew = None  # dummy weights' RouterSkewState (set_router_skew), for tests and logs

    def set_router_skew(self, state: RouterSkewState | RouterTraceState) -> None:
        self.router_skew = state

    def moe_layers(self) -> list[MoELayer]:
        return [l.mlp for l in self.layers if isinstance(l.mlp, MoELayer)]

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_real_tokens: int | None = None,
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rope.tables(meta.positions, x.dtype)
        residual = None
        with sdpa_backends(x.device):  # no cuDNN SDPA but where attend asks for it (see there)
            for layer, kv in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, cos, sin, meta, kv, num_real_tokens)
        if residual is None:
            return rms_norm(x, self.norm, self.config.rms_norm_eps)
        return rms_norm(x, self.norm, self.config.rms_norm_eps, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head)
