"""Test-only fault injection (``debug_fail_*`` keys) and the commit verifier
(``debug_verify_commits``): the two ways the tests prove that failures are survivable and that
commits move the right rows."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from eplb.balancer.placement import Placement
from eplb.controller.metrics import EplbMetrics

if TYPE_CHECKING:
    from eplb.config import EPLBConfig
    from eplb.model.moe import MoELayer
    from eplb.parallel.groups import DistContext

log = logging.getLogger("eplb.controller")

FREEZE_S = 3600.0  # "freeze": the rank's main loop blocks this long (a hung rank, for tests)


class InjectedTransferError(RuntimeError):
    """Raised on purpose by ``debug_fail_rank`` to test that a failed transfer is survivable."""


@dataclass(frozen=True)
class Fault:
    """What goes wrong on this rank in this rebalance.

    ``phase``: "policy" (rank 0's policy computation) or "transfer" (this rank's first layer).
    ``mode``: "raise" (an exception: abandonable), "stall" (the background part never finishes:
    the timeout abandons it), "freeze" (the rank's main loop hangs: the serving group is broken
    and the front must notice).
    """

    phase: str
    mode: str

    def freeze_here(self, phase: str) -> None:
        if self.mode == "freeze" and self.phase == phase:
            log.warning("debug_fail_mode freeze: this rank's main loop hangs in phase %s", phase)
            time.sleep(FREEZE_S)

    def error(self, what: str) -> InjectedTransferError:
        return InjectedTransferError(f"debug_fail_rank: {what}")


def fault_for(cfg: EPLBConfig, rank: int) -> Fault | None:
    """The fault ``debug_fail_*`` asks of ``rank`` (the caller injects it in one rebalance)."""
    if cfg.debug_fail_rank == rank:
        return Fault(cfg.debug_fail_phase, cfg.debug_fail_mode)
    return None


class CommitVerifier:
    """Checks commits against the checkpoint and the maps across ranks (collective)."""

    def __init__(self, checkpoint_path: str | None, metrics: EplbMetrics) -> None:
        self.checkpoint_path = checkpoint_path
        self.metrics = metrics
        self._reader = None

    def verify_layer(self, layer_idx: int, layer: MoELayer, placement: Placement, rank: int) -> None:
        """Each local slot's rows equal the checkpoint's rows of the expert the slot now names."""
        if self.checkpoint_path is None:
            return
        from eplb.model.checkpoint import CheckpointReader

        tensors = layer.expert_tensors()
        if self._reader is None:
            self._reader = CheckpointReader(self.checkpoint_path,
                                            dtype=next(iter(tensors.values())).dtype)
        s = placement.slots_per_rank
        base = rank * s
        for local in range(s):
            expert = int(placement.phy2log[layer_idx, base + local])
            want = self._reader.expert_tensors(layer_idx, expert)
            bad = set(want) != set(tensors) or not all(
                same_bits(tensors[k][local].cpu(), want[k].to(tensors[k].dtype)) for k in want
            )
            self.metrics.count_verify(bad)
            if bad:
                log.error("EPLB verify: rank %d layer %d slot %d does not hold expert %d",
                          rank, layer_idx, base + local, expert)

    def verify_maps(self, placement: Placement, layers: list[MoELayer], ctx: DistContext) -> None:
        """Every rank holds the same maps, and every layer's buffers match them (collective over
        the EP group: call at the same boundary on every rank)."""
        mine = placement.phy2log.to(ctx.comm_device)
        every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(every, mine, group=ctx.ep_group)
        same = all(torch.equal(o, mine) for o in every) and all(
            torch.equal(layer.phy2log.cpu(), placement.phy2log[i]) for i, layer in enumerate(layers)
        )
        self.metrics.count_verify(not same)
        if not same:
            log.error("EPLB verify: rank %d maps differ from another rank's or its layers'",
                      ctx.rank)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (works for float8, where torch.equal has no CPU kernel)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                              b.contiguous().view(torch.uint8))
