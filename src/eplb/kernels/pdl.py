"""Programmatic dependent launch (PDL, sm_90+) for the decode path's Triton kernels.

A decode step at small batch is a chain of ~13 short kernels per layer, each a few microseconds,
and a good part of each is the launch itself: the grid is set up only when the previous kernel has
fully finished. Launched with PDL (``launch_pdl=True``), a kernel's programs may become resident
while the previous kernel on the stream is still running; each of them first waits for that kernel
to finish and its writes to be visible (``griddepcontrol.wait``), then lets the next kernel launch
(``griddepcontrol.launch_dependents``). What is gained is the launch latency and, with
:func:`prefetch_l2`, the time to pull a kernel's weights into L2 while the previous kernel runs.

The rule that keeps it correct: every program of a PDL-launched kernel calls :func:`pdl_wait`
before its first read of anything an earlier kernel wrote, before its first write, and before an
early return. A kernel that completes has then waited for its predecessor, so completion is
transitive down the chain; only data no kernel writes (weights, scales, static tables) may be read
before the wait. Kernels launched without PDL (cuBLAS, torch ops, memsets) keep the stream's
ordinary full ordering, before and after. CUDA graph capture keeps these edges.

On by default for CUDA devices of compute capability 9.0 and above (never on older GPUs or under
triton's CPU interpreter); ``EPLB_PDL=0`` turns it off. On an H100 the full-size FP8 decode step
took 3.37 against 3.65 ms at batch 1, 11.90 against 12.11 at 32 and 15.59 against 15.66 at 128
with it (bench/results/ab-pdl-no-prefetch-h100-80gb-hbm3.json, scripts/dev/ab_decode_fusions.py).
With the L2 prefetch of the weights as well it had been slower than without PDL (4.06 against
3.77 ms at batch 1; bench/results/ab-pdl-h100-80gb-hbm3.json), so the prefetch is off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENV = "EPLB_PDL"
_SM90: dict[int, bool] = {}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel on the stream has finished (its writes visible), then let
    the next one launch. A no-op unless ``USE_PDL`` (the launch passed ``launch_pdl=True``)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at ``ptrs`` (a tensor of addresses) to be brought into L2. Writes
    nothing, returns nothing; for weights, before :func:`pdl_wait`."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; // $0", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(base, row_offs, row_len, LINE: tl.constexpr):
    """:func:`prefetch_l2` of whole rows: the elements [0, row_len) from ``base + row_offs[r]``
    (element offsets), LINE elements being one 128-byte line; 16 lines per row at a time."""
    for c0 in range(0, row_len, 16 * LINE):
        cols = tl.minimum(c0 + tl.arange(0, 16) * LINE, row_len - 1)
        prefetch_l2(base + row_offs[:, None] + cols[None, :])


def pdl_args(device: torch.device) -> dict[str, bool]:
    """The launch arguments of a kernel that calls :func:`pdl_wait`: its ``USE_PDL`` and triton's
    ``launch_pdl``, always equal (a PDL launch of a kernel that does not wait would race)."""
    on = use_pdl(device)
    return {"USE_PDL": on, "launch_pdl": on}


def use_pdl(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL: CUDA, compute capability >= 9.0, ``EPLB_PDL`` unset
    or 1.
    The variable is read at every call, so a process can compare both (graphs keep what they
    captured)."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get(ENV, "1") != "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM90:
        _SM90[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _SM90[idx]
