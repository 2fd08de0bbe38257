"""Lazy safetensors reading: single file or sharded index, block-FP8 dequantization,
per-expert and fused 3-D expert layouts.

Tensors are read one at a time straight into the requested dtype, so peak memory is the
model plus one tensor.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

from eplb.model.config import ModelConfig, load_config

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int], name: str = "weight_scale_inv"
) -> torch.Tensor:
    """weight [..., O, I] (fp8) * scale_inv [..., ceil(O/bo), ceil(I/bi)] block by block -> float32.

    Partial edge blocks use the scale of the block they fall in.
    """
    bo, bi = block
    o, i = weight.shape[-2:]
    want = (*weight.shape[:-2], -(-o // bo), -(-i // bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"{name} has shape {list(scale_inv.shape)}, expected {list(want)} "
            f"for weight {list(weight.shape)} with block {block}"
        )
    s = scale_inv.float().repeat_interleave(bo, dim=-2)[..., :o, :]
    s = s.repeat_interleave(bi, dim=-1)[..., :i]
    return weight.float() * s


class CheckpointReader:
    """Reads tensors of a Hugging Face checkpoint folder by name, lazily.

    ``dtype``: what tensors are converted to (None = as stored, FP8 weights dequantized
    to float32).
    """

    def __init__(self, path: str, dtype: torch.dtype | None = None, config: ModelConfig | None = None):
        self.path = path
        self.dtype = dtype
        self.config = config if config is not None else load_config(path)
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self._file_of: dict[str, str] = {}
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object")
            for name, fname in weight_map.items():
                self._file_of[name] = os.path.join(path, fname)
        elif os.path.exists(single):
            with safe_open(single, "pt") as f:
                for name in f.keys():
                    self._file_of[name] = single
        else:
            raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path!r} "
                             "(--load-format dummy makes random weights from config.json alone)")
        self._handles: dict[str, object] = {}
        self._expert_layout = self._detect_expert_layout()

    # -- raw access -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._file_of

    def keys(self) -> Iterator[str]:
        return iter(self._file_of)

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            if not os.path.exists(fname):
                raise ValueError(f"checkpoint shard {fname!r} listed in the index does not exist")
            h = safe_open(fname, "pt")
            self._handles[fname] = h
        return h

    def _raw(self, name: str, index: int | None = None) -> torch.Tensor:
        if name not in self._file_of:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        h = self._handle(self._file_of[name])
        if index is None:
            return h.get_tensor(name)
        return h.get_slice(name)[index]

    def shape(self, name: str) -> list[int]:
        if name not in self._file_of:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return list(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def get(
        self, name: str, shape: list[int] | tuple[int, ...] | None = None, index: int | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (row ``index`` of it if given), FP8 dequantized, cast to ``self.dtype``.

        ``shape`` is checked when given (ValueError naming the tensor).
        """
        t = self._raw(name, index)
        if t.dtype in FP8_DTYPES:
            block, sname = self._fp8_block_and_scale_name(name)
            t = dequantize_block_fp8(t, self._raw(sname, index), block, name=sname)
            if self.dtype is None:
                return self._check(name, t, shape)
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return self._check(name, t, shape)

    def _fp8_block_and_scale_name(self, name: str) -> tuple[list[int], str]:
        block = self.config.fp8_block_size
        if block is None:
            raise ValueError(f"tensor {name!r} is FP8 but config.json has no quantization_config")
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        sname = base + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        if not self.has(sname):
            raise ValueError(f"checkpoint is missing tensor {sname!r} (scale of FP8 {name!r})")
        return block, sname

    def get_fp8(
        self, name: str, shape: list[int] | tuple[int, ...], index: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``name`` [O, I] as block-FP8 with 128x128 blocks: ``(float8_e4m3fn [O, I],
        weight_scale_inv float32 [O/128, I/128])``.

        A tensor stored in FP8 is returned as stored (no rounding); one stored unquantized is
        quantized here (O and I must then be multiples of 128)."""
        from eplb.kernels.reference import FP8_BLOCK, quantize_block_fp8

        t = self._raw(name, index)
        if t.dtype not in FP8_DTYPES:
            self._check(name, t, shape)
            return quantize_block_fp8(t)
        block, sname = self._fp8_block_and_scale_name(name)
        if t.dtype != torch.float8_e4m3fn or list(block) != [FP8_BLOCK, FP8_BLOCK]:
            raise ValueError(
                f"tensor {name!r} is {t.dtype} with blocks {block}; FP8 weights are kept only as "
                f"float8_e4m3fn with [{FP8_BLOCK}, {FP8_BLOCK}] blocks")
        self._check(name, t, shape)
        s = self._raw(sname, index).float()
        want = [-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK)]
        if list(s.shape) != want:
            raise ValueError(f"{sname} has shape {list(s.shape)}, expected {want} for weight {list(shape)}")
        return t, s

    @staticmethod
    def _check(name: str, t: torch.Tensor, shape) -> torch.Tensor:
        if shape is not None and list(t.shape) != list(shape):
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    # -- experts ----------------------------------------------------------------------------
    def _moe_prefix(self, layer: int) -> str:
        p = f"model.layers.{layer}"
        if self.config.family == "mixtral" and not self.has(f"{p}.mlp.gate.weight"):
            return f"{p}.block_sparse_moe"
        return f"{p}.mlp"

    def _detect_expert_layout(self) -> str:
        if not self.config.moe_layers:
            return "none"
        pre = self._moe_prefix(self.config.moe_layers[0])
        return "fused" if self.has(f"{pre}.experts.gate_up_proj") else "per_expert"

    def router_weight(self, layer: int) -> torch.Tensor:
        c = self.config
        return self.get(f"{self._moe_prefix(layer)}.gate.weight", [c.num_experts, c.hidden_size])

    def expert_tensors(self, layer_idx: int, expert: int, fp8: bool | None = None) -> dict[str, torch.Tensor]:
        """One expert of MoE layer ``layer_idx`` (index into the MoE layers, not the decoder
        layers): ``w13 [2I, H]`` (gate rows then up rows) and ``w2 [H, I]``.

        ``fp8`` (default: whether the reader's dtype is float8_e4m3fn): block-FP8 as
        :meth:`get_fp8` gives it, plus ``w13_scale [2I/128, H/128]`` and ``w2_scale [H/128, I/128]``
        float32 -- the layout of :class:`eplb.model.moe.MoELayer` with ``quantization="fp8"``."""
        c = self.config
        if not 0 <= layer_idx < c.num_moe_layers:
            raise ValueError(f"layer_idx must be in [0, {c.num_moe_layers}), got {layer_idx}")
        if not 0 <= expert < c.num_experts:
            raise ValueError(f"expert must be in [0, {c.num_experts}), got {expert}")
        if fp8 is None:
            fp8 = self.dtype == torch.float8_e4m3fn
        layer = c.moe_layers[layer_idx]
        h, i = c.hidden_size, c.moe_intermediate_size
        pre = self._moe_prefix(layer)
        if self._expert_layout == "fused":
            names = [(f"{pre}.experts.gate_up_proj", [2 * i, h], expert),
                     (f"{pre}.experts.down_proj", [h, i], expert)]
        else:
            ns = ("w1", "w3", "w2") if pre.endswith("block_sparse_moe") else ("gate_proj", "up_proj", "down_proj")
            ep = f"{pre}.experts.{expert}"
            names = [(f"{ep}.{ns[0]}.weight", [i, h], None), (f"{ep}.{ns[1]}.weight", [i, h], None),
                     (f"{ep}.{ns[2]}.weight", [h, i], None)]
        if not fp8:
            ts = [self.get(n, shape, index=ix) for n, shape, ix in names]
            return {"w13": torch.cat(ts[:-1], dim=0) if len(ts) == 3 else ts[0], "w2": ts[-1]}
        if i % 128:
            # gate and up scales are stacked along O: only whole blocks line up
            raise ValueError(f"FP8 experts need moe_intermediate_size divisible by 128, got {i}")
        qs = [self.get_fp8(n, shape, index=ix) for n, shape, ix in names]
        up = qs[:-1]
        return {"w13": torch.cat([q for q, _ in up]) if len(up) > 1 else up[0][0],
                "w2": qs[-1][0],
                "w13_scale": torch.cat([s for _, s in up]) if len(up) > 1 else up[0][1],
                "w2_scale": qs[-1][1]}
