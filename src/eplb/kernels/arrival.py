"""Last-arrival reduction for split launches: the programs that share one output each store a
partial result and arrive at a counter; the last to arrive combines the partials in a fixed order
(deterministic, unlike float atomics) and resets the counter for the next launch.

Counters are int32 zeros in a buffer kept per device (``arrival_counters``). Every last arrival
sets its counter back to 0, so launches that run one after another on a stream share the buffer,
CUDA graph replays included. Launches on two streams at once must not share it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


@triton.jit
def last_to_arrive(cnt_ptr, n):
    """True in the last of the ``n`` programs that call this with the same counter. What every
    program stored before arriving is visible to the last one through L2: read it with
    ``cache_modifier=".cg"``."""
    tl.debug_barrier()  # every thread's stores are issued before this program's arrival
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def last_to_arrive_each(cnt_ptrs, n, mask):
    """``last_to_arrive`` per element of a tensor of counters (where ``mask``): True where this
    program is the last of the ``n`` that arrive at that counter, which is then reset. The rows
    of one program arrive at different counters, so a barrier follows the arrivals: no thread reads
    what another thread's arrival acquired before that arrival."""
    tl.debug_barrier()  # every thread's stores are issued before this program's arrivals
    last = mask & (tl.atomic_add(cnt_ptrs, 1, mask=mask, sem="acq_rel", scope="gpu") == n - 1)
    tl.debug_barrier()
    tl.atomic_xchg(cnt_ptrs, 0, mask=last, sem="relaxed", scope="gpu")
    return last


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 counters on ``device``, all 0 between launches."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # zeros made inside a capture are only written when the graph first replays
            raise RuntimeError("arrival counters are allocated on a launch's first eager run; run it "
                               "once outside CUDA graph capture (the engine's warm-up does)")
        if buf is not None:  # graphs captured with it keep its address: never free it
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf
