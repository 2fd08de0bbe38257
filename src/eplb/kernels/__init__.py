"""Fused MoE kernels for one EP rank's local expert slots.

``fused_moe``/``fused_moe_pairs``/``fused_experts`` run the Triton kernels (CUDA + triton needed;
``HAS_TRITON`` says whether triton imports; ``softmax_topk`` is the fused router tail);
``moe_torch``/``moe_pairs_torch`` are the plain torch
path with the same arguments, for CPU and as the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eplb.kernels.reference import (
    moe_pairs_torch,
    moe_torch,
    quant_dequant_act,
    quantize_block_fp8,
)

if TYPE_CHECKING:
    import torch

try:  # triton is only there on GPU machines
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


def triton_usable(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device`` (a CUDA device with triton installed)."""
    import torch

    return HAS_TRITON and torch.device(device).type == "cuda" and torch.cuda.is_available()


def triton_test_device() -> str | None:
    """Where the Triton kernel tests run: "cuda" (GPU + triton), "cpu" under triton's interpreter
    (``TRITON_INTERPRET=1`` with triton installed), None when neither (CI)."""
    import os

    import torch

    if HAS_TRITON and torch.cuda.is_available():
        return "cuda"
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


def __getattr__(name: str):
    # the Triton module is imported on first use so that CPU-only installs never touch it
    if name in ("fused_moe", "fused_moe_pairs", "fused_experts", "get_config", "new_pair_sort", "small_sort_fits"):
        from eplb.kernels import moe_triton

        return getattr(moe_triton, name)
    if name == "fp8_linear":
        from eplb.kernels import linear_fp8

        return linear_fp8.fp8_linear
    if name in ("rms_norm_fused", "qk_norm_rope"):
        from eplb.kernels import norm_rope

        return getattr(norm_rope, name)
    if name in ("softmax_topk", "route_topk", "route_logits_topk", "SORT_IN_ROUTER_MAX_TOKENS",
                "ROUTER_MATMUL_MAX_TOKENS"):
        from eplb.kernels import routing

        return getattr(routing, name)
    raise AttributeError(name)


__all__ = [
    "HAS_TRITON", "triton_usable", "triton_test_device", "fused_moe", "fused_moe_pairs", "fused_experts", "get_config",
    "softmax_topk", "route_topk", "route_logits_topk", "fp8_linear", "rms_norm_fused", "qk_norm_rope", "moe_torch",
    "moe_pairs_torch", "quant_dequant_act", "quantize_block_fp8",
]
