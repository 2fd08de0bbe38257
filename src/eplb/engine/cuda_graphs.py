"""Steps replayed from CUDA graphs captured at a fixed set of token counts.

Every row of a graph step is one token: its id, KV slot and position; it attends keys
[0, position] of its slot (the Triton decode kernel on CUDA), after the step's own keys were
written. A decode-only step of n sequences runs the graph of the smallest captured size >= n.
So does a step that mixes decodes with short prefill chunks (``run(..., sample_rows=)``): a
chunk's tokens are rows like any other, each seeing the chunk's earlier tokens through the
cache. Sizes up to ``max_batch`` (the KV slots) are the decode sizes; above it, steps of 128 up
to ``max_tokens``. Graphs above ``max_batch`` gather the rows to sample (at most ``max_batch``:
one per sequence) before the lm_head, so their logits cost what a decode step's do.

The first n rows of the static buffers hold the real tokens; padding rows read token 0 at
position 0 of the KV cache's scratch slot (context length 1), and are not counted as expert
load. Everything a step changes lives in those buffers (ids, slots, positions, context lengths,
rows to sample, the real-row count); the EPLB maps of the MoE layers live in fixed device
buffers too (``MoELayer.set_static_maps``), so a placement commit that copies new maps and
weights in place needs no re-capture.

On CPU (or with ``capture=False``) the same padded static forward runs eagerly: the tests check
this path against the plain engine step without a GPU.

With expert parallelism (an EP dispatcher that offers ``begin_static_step``, see
``eplb.parallel.all2all``) every DP rank runs the same padded size each decode step, agreed in the
rank loop's per-step all-reduce (``run(..., bs=agreed)``; a rank with no work runs ``bs`` padding
rows), and the dispatcher's static path keeps the EP collectives' shapes fixed, so they are
captured inside the graphs. Capture then runs collectives: every rank must capture together (the
rank's ``EngineCore.warm_up`` at startup).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from eplb.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from eplb.model.transformer import MoEForCausalLM

# steps above the decode sizes: graph sizes every MIXED_SIZE_STEP tokens
MIXED_SIZE_STEP = 128


def capture_sizes(max_batch: int, max_tokens: int | None = None) -> list[int]:
    """Sizes to capture. Decode sizes as vLLM's: 1, 2, 4, 8, then steps of 8 to 64, of 16 to
    256, of 32 beyond; always including ``max_batch``. Then, up to ``max_tokens`` (default
    ``max_batch``), multiples of MIXED_SIZE_STEP and ``max_tokens`` itself."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch]
    s = 8
    while s <= max_batch:
        sizes.append(s)
        s += 8 if s < 64 else 16 if s < 256 else 32
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    top = max_batch if max_tokens is None else max_tokens
    s = (max_batch // MIXED_SIZE_STEP + 1) * MIXED_SIZE_STEP
    while s < top:
        sizes.append(s)
        s += MIXED_SIZE_STEP
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """model: MoEForCausalLM; kv_layers: the KV cache's per-layer (k, v); scratch_slot: a KV
    slot no sequence owns; max_batch: the most rows a step samples (the KV slots); max_tokens:
    the largest step (default max_batch). ``run(ids, slots, positions)`` -> logits [n, V] (a
    view into a static buffer: consume it before the next call)."""

    def __init__(self, model: MoEForCausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]], *, max_batch: int,
                 scratch_slot: int, device: torch.device, capture: bool = True, max_tokens: int | None = None) -> None:
        self.model = model
        self.kv_layers = kv_layers
        max_tokens = max_batch if max_tokens is None else max(max_tokens, max_batch)
        self.sizes = capture_sizes(max_batch, max_tokens)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.scratch_slot = scratch_slot
        self.device = device
        self.capture_enabled = capture and device.type == "cuda"
        mt = max_tokens
        # rows: token ids, KV slots, positions, context lengths, rows to sample (the first
        # max_batch entries); filled by one copy per step
        # two host buffers taken in turn, each reused only once its last copy to the device has
        # run: with async scheduling the host fills the next step's rows while the previous
        # step's copy may still wait in the stream
        cuda = device.type == "cuda"
        self._host = [torch.zeros(5, mt, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._dev = torch.zeros(5, mt, dtype=torch.long, device=device)
        self.ids, self.slots, self.positions, self.ctx_lens, self.sample_rows = self._dev.unbind(0)
        self.num_real = torch.zeros((), dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # EP dispatchers with a static path, each once (one dispatcher serves every layer)
        self.static_dispatchers: list = []
        for layer in model.moe_layers():
            layer.set_static_maps(True)
            d = layer.dispatcher
            if hasattr(d, "begin_static_step") and all(d is not o for o in self.static_dispatchers):
                self.static_dispatchers.append(d)

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata.for_decode(self.slots[:bs], self.positions[:bs], self.ctx_lens[:bs])
        for d in self.static_dispatchers:  # Python-side mode: a replay does not need it again
            d.begin_static_step(bs, self.num_real)
        try:
            hidden = self.model(self.ids[:bs], meta, self.kv_layers, num_real_tokens=self.num_real)
        finally:
            for d in self.static_dispatchers:
                d.end_static_step()
        if bs > self.max_batch:  # a mixed step: only the rows to sample reach the lm_head
            hidden = hidden.index_select(0, self.sample_rows[: self.max_batch])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first, all in one memory pool. Padding-only inputs
        (num_real 0): nothing is counted and only the scratch slot is written."""
        if not self.capture_enabled or self.graphs:
            return
        self._fill([], [], [], self.max_tokens)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles and cuBLAS picks its kernels
            for bs in self.sizes:
                self._forward(bs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        pool = None
        for bs in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[bs] = self._forward(bs)
            pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize(self.device)

    def _fill(self, ids: list[int], slots: list[int], positions: list[int], bs: int | None = None,
              sample_rows: list[int] | None = None) -> None:
        """Rows [0, bs) of the static buffers: the n real rows, then padding (one tensor build,
        one host-to-device copy)."""
        n = len(ids)
        bs = self.max_batch if bs is None else bs
        pad = bs - n
        sample = list(range(n)) if sample_rows is None else sample_rows
        rows = [ids + [0] * pad, slots + [self.scratch_slot] * pad, positions + [0] * pad,
                [p + 1 for p in positions] + [1] * pad,  # context length = position + 1
                sample + [0] * (bs - len(sample))]
        self._turn = i = 1 - self._turn
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        h = self._host[i][:, :bs]
        h.copy_(torch.tensor(rows, dtype=torch.long))
        self._dev[:, :bs].copy_(h, non_blocking=True)
        if self.device.type == "cuda":
            self._copied[i] = torch.cuda.Event()
            self._copied[i].record()
        self.num_real.fill_(n)

    def fits(self, n: int) -> bool:
        """A step of n tokens has a graph size."""
        return 0 < n <= self.max_tokens

    def size_for(self, n: int) -> int | None:
        """The smallest captured size >= n (a pure function of n and max_batch, so ranks with the
        same max_batch agree), or None when n is 0 or too large."""
        return self.sizes[bisect.bisect_left(self.sizes, n)] if self.fits(n) else None

    @torch.inference_mode()
    def run(self, ids: list[int], slots: list[int], positions: list[int], *,
            bs: int | None = None, sample_rows: list[int] | None = None,
            first_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``len(ids)`` rows at size ``bs`` (default: the smallest that fits) -> the logits
        of every row, or of ``sample_rows`` (at most ``max_batch``, in that order). An explicit
        ``bs`` (the size the DP ranks agreed on) may carry zero real rows: a rank with no work
        runs the same graph as its peers. ``first_ids``: the ids of rows [0, len(first_ids)) as a
        device tensor (tokens an earlier step sampled and the host has not read yet; ``ids`` holds
        placeholders there), copied in on the device after the host rows."""
        n = len(ids)
        if first_ids is not None and len(first_ids) > n:
            raise ValueError(f"first_ids has {len(first_ids)} rows, the step {n}")
        if bs is None:
            bs = self.size_for(n)
            if bs is None:
                raise ValueError(f"step of {n} tokens does not fit the captured sizes (max {self.max_tokens})")
        elif bs not in self.sizes or n > bs:
            raise ValueError(f"step of {n} tokens at size {bs}: not one of {self.sizes} or too small")
        if sample_rows is not None and len(sample_rows) > min(n, self.max_batch):
            raise ValueError(f"{len(sample_rows)} rows to sample: more than {min(n, self.max_batch)}")
        if sample_rows is None and bs > self.max_batch:
            raise ValueError(f"a step of size {bs} > {self.max_batch} samples at most {self.max_batch} rows: "
                             "give sample_rows")
        self._fill(ids, slots, positions, bs, sample_rows)
        if first_ids is not None:
            self.ids[: len(first_ids)].copy_(first_ids)
        if bs in self.graphs:
            self.graphs[bs].replay()
            logits = self.outputs[bs]
        else:
            logits = self._forward(bs)
        if sample_rows is None:
            return logits[:n]
        if bs > self.max_batch:  # gathered inside the step
            return logits[: len(sample_rows)]
        return logits.index_select(0, self.sample_rows[: len(sample_rows)])
