"""``load_format="dummy"``: random weights of a checkpoint's shapes, made on the device from
``config.json`` alone (vLLM's ``--load-format dummy``), and an optional skewed router (a drifting
Zipf window, or the replay of a recorded load trace).

Values (chosen so activations stay finite through many layers, and routing looks like a
trained model's: every token picks a spread of experts):
- norms 1; router ``N(0, 1/hidden)`` so router logits are about ``N(0, 1)`` at any hidden size;
- every other matrix (embeddings, attention, dense MLP, experts, lm_head) ``N(0, 0.02^2)``
  (Hugging Face's ``initializer_range``);
- with an FP8 ``quantization_config`` the quantized matrices are made as block-FP8: e4m3 values
  drawn from ``N(0, 1)`` and one ``weight_scale_inv`` per 128x128 block drawn from
  ``U(0.015, 0.025)``; kept in FP8 they are stored as is, dequantized they are those numbers.

Every tensor is drawn from its own generator seeded by (seed, tensor name), and an expert's by
(seed, layer, logical expert), so a rank that holds only some slots (EP) or a replica makes the
same numbers as one process holding all of them, and a DP replica equals every other.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from eplb.model.transformer import MoEForCausalLM

STD = 0.02  # N(0, STD^2) for plain matrices
FP8_SCALE_RANGE = (0.015, 0.025)  # weight_scale_inv per block; e4m3 values are N(0, 1)
BLOCK = 128


def _gen(device: torch.device, seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    return g


def _normal_(t: torch.Tensor, std: float, g: torch.Generator) -> None:
    t.normal_(0.0, std, generator=g)


def _fp8_pair(shape: tuple[int, int], device: torch.device, g: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [O, I], float32 weight_scale_inv [O/128, I/128]) for one matrix."""
    o, i = shape
    q = torch.empty(o, i, dtype=torch.bfloat16, device=device).normal_(0.0, 1.0, generator=g)
    q = q.to(torch.float8_e4m3fn)
    s = torch.empty(-(-o // BLOCK), -(-i // BLOCK), dtype=torch.float32, device=device)
    s.uniform_(*FP8_SCALE_RANGE, generator=g)
    return q, s


def _fill_matrix(w: torch.Tensor, scale: torch.Tensor | None, fp8_config: bool,
                 g: torch.Generator) -> None:
    """Fill one weight matrix [O, I] (and its scale when kept in FP8). ``fp8_config``: the
    config is block-FP8, so the numbers are block-FP8 ones even when dequantized."""
    if scale is not None:
        q, s = _fp8_pair(tuple(w.shape), w.device, g)
        w.copy_(q)
        scale.copy_(s)
    elif fp8_config:
        from eplb.model.checkpoint import dequantize_block_fp8

        q, s = _fp8_pair(tuple(w.shape), w.device, g)
        w.copy_(dequantize_block_fp8(q, s, [BLOCK, BLOCK]))
    else:
        _normal_(w, STD, g)


@torch.no_grad()
def init_dummy_weights(model: MoEForCausalLM, seed: int = 0) -> None:
    """Fill every parameter of ``model`` (an :class:`eplb.model.transformer.MoEForCausalLM` built
    with empty tensors) in place, on the device its tensors live on."""
    from eplb.model.moe import MoELayer

    cfg = model.config
    fp8_config = cfg.fp8_block_size is not None
    dev = model.embed.device
    h = cfg.hidden_size

    _normal_(model.embed, STD, _gen(dev, seed, "embed"))
    model.norm.fill_(1.0)
    if model.lm_head is not model.embed:
        _normal_(model.lm_head, STD, _gen(dev, seed, "lm_head"))
    for li, layer in enumerate(model.layers):
        p = f"layers.{li}"
        layer.input_norm.fill_(1.0)
        layer.post_norm.fill_(1.0)
        a = layer.attn
        _fill_matrix(a.qkv, a.qkv_scale, fp8_config, _gen(dev, seed, f"{p}.qkv"))
        _fill_matrix(a.o, a.o_scale, fp8_config, _gen(dev, seed, f"{p}.o"))
        for name in ("qkv_bias", "o_bias"):
            if getattr(a, name, None) is not None:
                getattr(a, name).zero_()
        if cfg.qk_norm != "none":
            a.q_norm.fill_(1.0)
            a.k_norm.fill_(1.0)
        mlp = layer.mlp
        if isinstance(mlp, MoELayer):
            _normal_(mlp.gate_weight, 1.0 / math.sqrt(h), _gen(dev, seed, f"{p}.router"))
            t = mlp.expert_tensors()
            phy2log = mlp.phy2log.tolist()
            for local, slot in enumerate(range(mlp.slot_start, mlp.slot_end)):
                g = _gen(dev, seed, f"{p}.expert.{phy2log[slot]}")
                _fill_matrix(t["w13"][local], t["w13_scale"][local] if "w13_scale" in t else None,
                             fp8_config, g)
                _fill_matrix(t["w2"][local], t["w2_scale"][local] if "w2_scale" in t else None,
                             fp8_config, g)
        else:
            _fill_matrix(mlp.w13, mlp.w13_scale, fp8_config, _gen(dev, seed, f"{p}.w13"))
            _fill_matrix(mlp.w2, mlp.w2_scale, fp8_config, _gen(dev, seed, f"{p}.w2"))


# ------------------------------------------------------------------------------ router skew

# The calibrated skew: balancedness about 0.5 at EP 2 with EPLB off (docs/model.md)
DEFAULT_ZIPF_S = 1.5
DEFAULT_DRIFT_STEPS = 200


@dataclass(frozen=True)
class RouterSkew:
    """Bias every MoE layer's router toward a Zipf-ranked set of hot experts that drifts.

    Layer l ranks its experts r = (e - offset_l - k) mod E, where offset_l is a random start of
    the layer's hot window and k = forward steps // ``drift_steps`` (0 = no drift); the router
    logit of rank r gets ``-zipf_s * ln(r + 1)`` added, i.e. the router's softmax is multiplied by
    a Zipf(zipf_s) prior ``(r + 1)^-zipf_s``. Hot experts are neighbours, so with the default
    contiguous placement they crowd onto one EP rank until EPLB moves them; each drift step makes
    the next expert the hottest.
    """

    zipf_s: float
    drift_steps: int = DEFAULT_DRIFT_STEPS
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.zipf_s, (int, float)) and math.isfinite(self.zipf_s) and self.zipf_s > 0):
            raise ValueError(f"dummy_router_skew must be a number > 0, got {self.zipf_s!r}")
        if isinstance(self.drift_steps, bool) or not isinstance(self.drift_steps, int) or self.drift_steps < 0:
            raise ValueError(f"dummy_router_drift must be an integer >= 0 (0 = no drift), got {self.drift_steps!r}")

    @property
    def advances(self) -> bool:
        """The bias moves with forward steps (a drifting window)."""
        return bool(self.drift_steps)


class RouterSkewState:
    """Device buffers of a :class:`RouterSkew`: ``bias [L, E]`` (row l is layer l's router bias,
    read by ``F.linear``) and a step counter, advanced by ``advance()`` once per forward with
    device ops only, so it is captured in and replayed by CUDA graphs with no host sync."""

    def __init__(self, skew: RouterSkew, num_layers: int, num_experts: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.skew = skew
        g = torch.Generator().manual_seed(skew.seed)
        e = num_experts
        self.num_experts = e
        self.offset = torch.randint(0, e, (num_layers, 1), generator=g).to(device)
        self.ids = torch.arange(e, device=device)[None, :]
        self.table = (-skew.zipf_s * torch.log(torch.arange(e, dtype=torch.float32) + 1)).to(device=device, dtype=dtype)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.bias = torch.empty(num_layers, e, dtype=dtype, device=device)
        self._update()

    def _update(self) -> None:
        k = self.step // self.skew.drift_steps if self.skew.drift_steps else 0
        rank = torch.remainder(self.ids - self.offset - k, self.num_experts)
        self.bias.copy_(self.table[rank])

    def advance(self) -> None:
        self.step.add_(1)
        self._update()


@dataclass(frozen=True)
class RouterTrace:
    """Replay a recorded expert-load trace (``eplb serve --record-trace``, ``eplb.sim.traces``
    format: ``load [steps, L, E]``) through the routers: at forward step t (from 0, dummy steps
    counted) layer l's router logits get ``ln p`` added, p = row ``t mod steps`` of the trace for
    layer l, smoothed
    ``(load + 0.5) / (sum + 0.5 E)``, i.e. the router's softmax is multiplied by the recorded
    step's expert popularity. Routing then follows the trace's per-step imbalance (with the random
    router's own noise on top). ``path`` names the file in errors."""

    path: str
    load: object  # numpy int64 [steps, L, E]

    @property
    def advances(self) -> bool:
        """A trace moves every forward step."""
        return True


class RouterTraceState:
    """Device buffers of a :class:`RouterTrace`: ``table [steps, L, E]`` (log-popularity per
    recorded step), ``bias [L, E]`` (the current step's rows) and a step counter; ``advance()``
    uses device ops only (graph-capturable), like :class:`RouterSkewState`."""

    def __init__(self, trace: RouterTrace, num_layers: int, num_experts: int, dtype: torch.dtype,
                 device: torch.device | str):
        load = torch.as_tensor(trace.load, dtype=torch.float64)
        steps, layers, experts = load.shape
        if (layers, experts) != (num_layers, num_experts):
            raise ValueError(f"dummy_router_trace {trace.path}: load of {layers} layers x {experts} experts, "
                             f"the model has {num_layers} MoE layers x {num_experts} experts")
        p = (load + 0.5) / (load.sum(-1, keepdim=True) + 0.5 * experts)
        self.trace = trace
        self.num_steps = steps
        self.table = torch.log(p).to(device=device, dtype=dtype)
        # the first MoE layer advances before it routes: starting at -1, forward t reads row t
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.bias = self.table[steps - 1].clone()

    def advance(self) -> None:
        self.step.add_(1)
        self.bias.copy_(self.table.index_select(0, torch.remainder(self.step, self.num_steps).view(1))[0])


def install_router_skew(model: MoEForCausalLM, skew: RouterSkew | RouterTrace) -> RouterSkewState | RouterTraceState:
    """Give each MoE layer its row of the skew's (or trace's) bias; the first MoE layer advances
    the step counter before it routes (so every forward counts once, replayed graphs included)."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("dummy_router_skew needs a model with MoE layers")
    kind = RouterTraceState if isinstance(skew, RouterTrace) else RouterSkewState
    state = kind(skew, len(layers), layers[0].num_experts, layers[0].gate_weight.dtype,
                 layers[0].gate_weight.device)
    for i, layer in enumerate(layers):
        layer.set_router_skew(state.bias[i], state.advance if skew.advances and i == 0 else None)
    model.set_router_skew(state)
    return state


def router_skew(zipf_s: float | None, drift_steps: int | None = None, seed: int = 0,
                trace: str | None = None) -> RouterSkew | RouterTrace | None:
    """The engine's ``dummy_router_skew`` / ``dummy_router_drift`` / ``dummy_router_trace``
    options as a RouterSkew or RouterTrace (None when none is given; ValueError naming the option
    when a value is bad or the trace cannot be read)."""
    if trace is not None:
        if zipf_s is not None or drift_steps is not None:
            raise ValueError("dummy_router_trace replaces dummy_router_skew/dummy_router_drift: give one or the other")
        from eplb.sim.traces import load_trace

        try:
            return RouterTrace(str(trace), load_trace(trace))
        except ValueError as exc:
            raise ValueError(f"dummy_router_trace: {exc}") from None
    if zipf_s is None:
        if drift_steps is not None:
            raise ValueError("dummy_router_drift needs dummy_router_skew")
        return None
    return RouterSkew(zipf_s, DEFAULT_DRIFT_STEPS if drift_steps is None else drift_steps, seed)
