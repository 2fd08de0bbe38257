"""EPLB on one rank: load window, rebalance trigger, sync and async rebalances, metrics, trace.

The rank's main loop drives it at every step boundary:

1. ``packet()`` -> this rank's part of the per-step all-reduce (SUM): a failure flag, this rank's
   async readiness (one-hot over ranks) and the expert load of the previous forward ``[L, E]``.
2. ``on_boundary(summed, forward_before)`` with the reduced vector: records the global load in
   the window (and the trace), commits async layers every rank has staged, abandons a rebalance
   that failed or timed out anywhere, and every ``step_interval`` forward steps starts a
   rebalance (sync: right here, all ranks together; async: a background ``AsyncRebalance``).
3. ``collect_step_load()`` after each forward.

Every decision is a function of the reduced vector and of counters that advance identically on
all ranks, so all ranks commit, abandon and trigger at the same step boundary. Local clocks only
raise the failure flag, which the all-reduce then spreads.

After a failure the layers not yet committed keep the old placement on every rank (layers
committed before the failure stay on the new one: each committed layer is complete and
consistent on every rank).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from eplb.balancer.placement import Placement
from eplb.balancer.stats import LoadWindow, balancedness
from eplb.config import EPLBConfig
from eplb.controller.async_rebalance import AsyncRebalance, InjectedTransferError
from eplb.parallel.groups import DistContext, new_transfer_group
from eplb.parallel.transfer import commit_layer, plan_bytes, stage_layer

log = logging.getLogger("eplb.parallel")

MAX_EVENTS = 100  # rebalance events and interval balancedness figures kept for stats()


@dataclass
class EplbMetrics:
    rebalances: int = 0
    rebalances_failed: int = 0
    copies_moved: int = 0
    bytes_moved: int = 0
    last_rebalance_s: float = 0.0
    total_rebalance_s: float = 0.0
    last_policy_s: float = 0.0
    steps_during_last_rebalance: int = 0  # forward steps served while the last async one ran
    layers_committed: int = 0
    balancedness: float | None = None  # mean per-step balancedness of the last interval
    balancedness_history: list[float] = field(default_factory=list)  # one per interval
    verify_checks: int = 0
    verify_mismatches: int = 0
    # the last rebalances, oldest first: {"ok", "step", "layers_committed", "copies",
    # "seconds", "steps_in_flight"}; layers_committed of a failed one = layers it changed
    events: list[dict] = field(default_factory=list)

    def add_event(self, **event) -> None:
        self.events.append(event)
        del self.events[:-MAX_EVENTS]

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_rebalance_s"] = self.total_rebalance_s / self.rebalances if self.rebalances else 0.0
        d["balancedness_history"] = list(self.balancedness_history[-MAX_EVENTS:])
        d["events"] = [dict(e) for e in self.events]
        return d


def initial_placement(
    num_layers: int, num_experts: int, world_size: int, cfg: EPLBConfig | None
) -> Placement:
    """The placement the ranks load with: linear, redundant slots round-robin."""
    redundant = cfg.num_redundant_experts if cfg is not None else 0
    if (num_experts + redundant) % world_size:
        raise ValueError(
            f"num_redundant_experts ({redundant}) + experts ({num_experts}) must be divisible by "
            f"data_parallel_size ({world_size})"
        )
    return Placement.default(num_layers, num_experts, world_size, redundant)


class EplbState:
    """Per-rank EPLB driver (see the module docstring).

    ``layers``: the model's MoE layers (``MoELayer`` contract). ``cfg`` None = EPLB off (the
    state then only records loads for ``record_trace``).
    """

    def __init__(
        self,
        cfg: EPLBConfig | None,
        ctx: DistContext,
        layers: list,
        placement: Placement,
        *,
        record_trace: str | None = None,
        checkpoint_path: str | None = None,
    ) -> None:
        self.enabled = cfg is not None
        self.cfg = cfg if cfg is not None else EPLBConfig()
        self.ctx = ctx
        self.layers = layers
        self.placement = placement
        self.num_layers = placement.num_layers
        self.num_experts = placement.num_experts
        self.record_trace = record_trace
        self.checkpoint_path = checkpoint_path
        self.collect = self.enabled or record_trace is not None
        self.window = LoadWindow(self.cfg.window_size, self.num_layers, self.num_experts)
        self.metrics = EplbMetrics()
        self.steps = 0  # forward steps recorded (identical on every rank)
        self._pending = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        # rank 0 streams the trace to PATH.partial (raw int64 [L, E] per step) so a long run holds
        # no trace in memory; close() turns it into the simulator's .npz at PATH
        self._trace_file = None
        self._trace_steps = 0
        if record_trace is not None and ctx.rank == 0:
            self._trace_file = open(record_trace + ".partial", "wb")  # noqa: SIM115
        self._bal_sum = 0.0
        self._bal_n = 0
        self._generation = 0
        self._inflight: AsyncRebalance | None = None
        self._committed = 0  # async: layers of the rebalance in flight committed so far
        self._copies_this = 0  # copies committed by the current rebalance
        self._steps_inflight = 0
        self._fail_pending = self.cfg.debug_fail_rank == ctx.rank
        self._reader = None
        self._policy = None
        self.synced_at_boundary = False  # a sync rebalance ran at the last boundary

    # ----- per-step protocol -----------------------------------------------------------------
    @property
    def packet_size(self) -> int:
        g = self.ctx.world_size
        return 1 + g + (self.num_layers * self.num_experts if self.collect else 0)

    def collect_step_load(self) -> None:
        """After a forward (real or dummy): take the layers' counts of real tokens."""
        if self.collect:
            # one device-to-host copy per step, not one per layer
            self._pending += torch.stack([layer.take_load() for layer in self.layers]).cpu()

    def packet(self) -> torch.Tensor:
        """This rank's part of the per-step all-reduce (SUM); int64 ``[packet_size]``."""
        g = self.ctx.world_size
        out = torch.zeros(self.packet_size, dtype=torch.long)
        r = self._inflight
        if r is not None:
            if r.failed():
                out[0] = 1
            elif time.monotonic() - r.last_progress > self.cfg.transfer_timeout_s:
                log.warning("EPLB rebalance %d timed out on rank %d: no progress for %.1fs",
                            r.generation, self.ctx.rank, self.cfg.transfer_timeout_s)
                out[0] = 1
            out[1 + self.ctx.rank] = r.ready_count()
        if self.collect:
            out[1 + g:] = self._pending.view(-1)
            self._pending.zero_()
        return out

    def on_boundary(self, summed: torch.Tensor, forward_before: bool) -> None:
        """Act on the reduced packet; ``forward_before``: the previous iteration ran a forward."""
        g = self.ctx.world_size
        summed = summed.to("cpu")
        self.synced_at_boundary = False
        if forward_before and self.collect:
            self._record(summed[1 + g:].view(self.num_layers, self.num_experts))
        if not self.enabled:
            return
        if self._inflight is not None:
            if forward_before:
                self._steps_inflight += 1
            if int(summed[0]) > 0:
                self._abandon("a rank reported a failed or timed-out transfer")
            else:
                self._commit_ready(int(summed[1:1 + g].min()))
                if self._inflight is not None:
                    self._inflight.tick()
        if forward_before and self.steps % self.cfg.step_interval == 0:
            self._close_interval()
            # nothing to fit on a window without load (every rank sees the same total)
            if self._inflight is None and int(self.window.total().sum()) > 0:
                if self.cfg.use_async:
                    self._start_async()
                else:
                    self._rebalance_sync()
                    self.synced_at_boundary = True

    # ----- load bookkeeping ------------------------------------------------------------------
    def _record(self, load: torch.Tensor) -> None:
        self.steps += 1
        self.window.record(load)
        if self._trace_file is not None:
            self._trace_file.write(load.numpy().astype(np.int64).tobytes())
            self._trace_steps += 1
        if int(load.sum()) > 0:
            self._bal_sum += float(balancedness(load, self.placement).mean())
            self._bal_n += 1

    def _close_interval(self) -> None:
        if not self._bal_n:
            return
        value = self._bal_sum / self._bal_n
        self.metrics.balancedness = value
        self.metrics.balancedness_history.append(value)
        del self.metrics.balancedness_history[:-MAX_EVENTS]
        self._bal_sum, self._bal_n = 0.0, 0
        if self.cfg.log_balancedness and self.ctx.rank == 0:
            log.info("EPLB step %d: balancedness %.4f (mean over layers and the last %d steps)",
                     self.steps, value, self.cfg.step_interval)

    # ----- placement computation (rank 0 computes, all receive) ------------------------------
    def _compute_new(self, load: torch.Tensor, old: Placement, group) -> Placement:
        shape = tuple(old.phy2log.shape)
        buf = torch.empty(shape, dtype=torch.long, device=self.ctx.comm_device)
        if self.ctx.rank == 0:
            try:
                t0 = time.monotonic()
                new = self._get_policy()(
                    load, old.num_ranks, old.num_redundant, previous=old,
                    max_moves=self.cfg.max_moves_per_rebalance,
                )
                self.metrics.last_policy_s = time.monotonic() - t0
                buf.copy_(new.phy2log)
            except Exception as exc:  # noqa: BLE001 - the others must not wait forever
                log.warning("EPLB policy %r failed: %s", self.cfg.policy, exc)
                buf.fill_(-1)
        dist.broadcast(buf, src=0, group=group)
        phy2log = buf.to("cpu")
        if int(phy2log.min()) < 0:
            raise RuntimeError(f"EPLB policy {self.cfg.policy!r} failed on rank 0")
        return Placement.from_phy2log(phy2log, old.num_experts, old.num_ranks)

    def _get_policy(self):
        if self._policy is None:
            from eplb.balancer.policies import get_policy

            self._policy = get_policy(self.cfg.policy)
        return self._policy

    @staticmethod
    def _plan(old: Placement, new: Placement) -> list[list]:
        from eplb.balancer.planner import plan

        return plan(old, new)

    # ----- commit / abandon ------------------------------------------------------------------
    def _apply_layer(self, layer_idx: int, new: Placement) -> None:
        """Swap layer ``layer_idx``'s maps to ``new``'s (its weights are already in place)."""
        phy2log = self.placement.phy2log.clone()
        phy2log[layer_idx] = new.phy2log[layer_idx]
        self.placement = Placement.from_phy2log(phy2log, self.num_experts, self.ctx.world_size)
        p = self.placement
        self.layers[layer_idx].set_placement(
            p.phy2log[layer_idx].clone(), p.log2phy[layer_idx].clone(),
            p.replica_count[layer_idx].clone(),
        )
        self.metrics.layers_committed += 1
        if self.cfg.debug_verify_commits:
            self._verify_weights(layer_idx)

    def _commit_ready(self, min_ready: int) -> None:
        r = self._inflight
        if min_ready < 1:  # some rank has no plan yet
            return
        staged_everywhere = min_ready - 1
        while self._committed < staged_everywhere:
            layer = r.moving[self._committed]
            commit_layer(self.layers[layer].expert_tensors(), r.take(self._committed))
            self._apply_layer(layer, r.new)
            moved = r.transfers[layer]
            self.metrics.copies_moved += len(moved)
            self.metrics.bytes_moved += plan_bytes(moved, self.layers[layer].expert_tensors())
            self._copies_this += len(moved)
            self._committed += 1
        if self._committed == len(r.moving):
            self.metrics.steps_during_last_rebalance = self._steps_inflight
            self._inflight = None
            self._finish(time.monotonic() - r.started, r.policy_s, self._committed)

    def _finish(self, elapsed: float, policy_s: float, layers: int) -> None:
        m = self.metrics
        m.rebalances += 1
        m.last_rebalance_s = elapsed
        m.total_rebalance_s += elapsed
        if policy_s:
            m.last_policy_s = policy_s
        m.add_event(ok=True, step=self.steps, layers_committed=layers, copies=self._copies_this,
                    seconds=elapsed, steps_in_flight=self._steps_inflight)
        if self.cfg.debug_verify_commits:
            self._verify_maps()
        if self.ctx.rank == 0:
            log.info("EPLB rebalance %d done in %.3fs (%d copies moved so far)",
                     m.rebalances, elapsed, m.copies_moved)

    def _abandon(self, why: str) -> None:
        r = self._inflight
        kept = len(r.moving) - self._committed if r.planned else self.num_layers
        r.cancel()
        self._inflight = None
        self._fail(f"{why}; {kept} layer(s) keep the old placement", self._committed,
                   time.monotonic() - r.started)

    def _fail(self, why: str, layers: int, elapsed: float) -> None:
        self.metrics.rebalances_failed += 1
        self.metrics.add_event(ok=False, step=self.steps, layers_committed=layers,
                               copies=self._copies_this, seconds=elapsed,
                               steps_in_flight=self._steps_inflight)
        if self.ctx.rank == 0:
            log.warning("EPLB rebalance abandoned on every rank: %s", why)
        # The old transfer group may hold unmatched or timed-out messages: never reuse it.
        self.ctx.transfer_group = new_transfer_group(self.ctx)
        if self.cfg.debug_verify_commits:
            self._verify_maps()

    # ----- rebalances ------------------------------------------------------------------------
    def _take_fail_injection(self) -> int | None:
        if self._fail_pending:
            self._fail_pending = False
            return 0
        return None

    def _start_async(self) -> None:
        self._generation += 1
        self._committed = 0
        self._copies_this = 0
        self._steps_inflight = 0
        load, old = self.window.total(), self.placement
        self._inflight = AsyncRebalance(
            generation=self._generation,
            rank=self.ctx.rank,
            slots_per_rank=self.placement.slots_per_rank,
            group=self.ctx.transfer_group,
            old=old,
            compute_new=lambda group: self._compute_new(load, old, group),
            plan_fn=self._plan,
            tensors_of=lambda layer: self.layers[layer].expert_tensors(),
            max_staged_layers=self.cfg.max_staged_layers,
            delay_per_layer_s=self.cfg.debug_transfer_delay_s,
            fail_at_layer=self._take_fail_injection(),
            fail_mode=self.cfg.debug_fail_mode,
            device=self.ctx.device,
        ).start()

    def _rebalance_sync(self) -> None:
        """All ranks stop here, move every layer's experts, swap maps layer by layer."""
        t0 = time.monotonic()
        old = self.placement
        self._copies_this = 0
        self._steps_inflight = 0
        try:
            new = self._compute_new(self.window.total(), old, self.ctx.ep_group)
        except RuntimeError as exc:
            self._fail(str(exc), 0, time.monotonic() - t0)
            return
        policy_s = self.metrics.last_policy_s
        transfers = self._plan(old, new)
        fail_at = self._take_fail_injection()
        index = 0
        for layer, moved in enumerate(transfers):
            if not moved:
                continue
            ok = 1
            try:
                if fail_at is not None and index == fail_at:
                    if self.cfg.debug_fail_mode == "stall":  # peers' P2P ops time out meanwhile
                        time.sleep(self.cfg.transfer_timeout_s)
                    raise InjectedTransferError(
                        f"debug_fail_rank: rank {self.ctx.rank} fails its transfer of layer {layer}"
                    )
                tensors = self.layers[layer].expert_tensors()
                staged = stage_layer(layer, moved, self.ctx.rank, tensors,
                                     old.slots_per_rank, self.ctx.transfer_group)
                if self.cfg.debug_transfer_delay_s:
                    time.sleep(self.cfg.debug_transfer_delay_s)
            except Exception as exc:  # noqa: BLE001 - turned into a collective decision below
                log.warning("EPLB sync transfer of layer %d failed on rank %d: %s",
                            layer, self.ctx.rank, exc)
                ok = 0
            flag = torch.tensor([ok], dtype=torch.long, device=self.ctx.comm_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.ctx.ep_group)
            if int(flag.item()) == 0:
                kept = sum(1 for t in transfers[layer:] if t)
                self._fail(f"transfer of layer {layer} failed; {kept} layer(s) keep the old "
                           "placement", index, time.monotonic() - t0)
                return
            commit_layer(tensors, staged)
            self._apply_layer(layer, new)
            self.metrics.copies_moved += len(moved)
            self.metrics.bytes_moved += plan_bytes(moved, tensors)
            self._copies_this += len(moved)
            index += 1
        self._finish(time.monotonic() - t0, policy_s, index)

    # ----- checks (debug_verify_commits) -----------------------------------------------------
    def _verify_weights(self, layer_idx: int) -> None:
        """Each local slot's rows equal the checkpoint's rows of the expert the slot now names."""
        if self.checkpoint_path is None:
            return
        from eplb.model.checkpoint import CheckpointReader

        tensors = self.layers[layer_idx].expert_tensors()
        if self._reader is None:
            self._reader = CheckpointReader(self.checkpoint_path,
                                            dtype=next(iter(tensors.values())).dtype)
        s = self.placement.slots_per_rank
        base = self.ctx.rank * s
        for local in range(s):
            expert = int(self.placement.phy2log[layer_idx, base + local])
            want = self._reader.expert_tensors(layer_idx, expert)
            self.metrics.verify_checks += 1
            if set(want) != set(tensors) or not all(
                _same_bits(tensors[k][local].cpu(), want[k].to(tensors[k].dtype)) for k in want
            ):
                self.metrics.verify_mismatches += 1
                log.error("EPLB verify: rank %d layer %d slot %d does not hold expert %d",
                          self.ctx.rank, layer_idx, base + local, expert)

    def _verify_maps(self) -> None:
        """Every rank holds the same maps, and every layer's buffers match them (collective)."""
        mine = self.placement.phy2log.to(self.ctx.comm_device)
        every = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(every, mine, group=self.ctx.ep_group)
        self.metrics.verify_checks += 1
        same = all(torch.equal(o, mine) for o in every) and all(
            torch.equal(layer.phy2log.cpu(), self.placement.phy2log[i])
            for i, layer in enumerate(self.layers)
        )
        if not same:
            self.metrics.verify_mismatches += 1
            log.error("EPLB verify: rank %d maps differ from another rank's or its layers'",
                      self.ctx.rank)

    # ----- end -------------------------------------------------------------------------------
    @property
    def rebalance_in_flight(self) -> bool:
        return self._inflight is not None

    def stats(self) -> dict:
        d = self.metrics.as_dict()
        d["eplb_steps"] = self.steps
        d["rebalance_in_flight"] = self.rebalance_in_flight
        if d["balancedness"] is None and self._bal_n:
            d["balancedness"] = self._bal_sum / self._bal_n
        return d

    def close(self) -> None:
        """Stop a rebalance in flight and write the trace (rank 0)."""
        if self._inflight is not None:
            self._inflight.cancel()
            self._inflight = None
        if self._trace_file is None:
            return
        self._trace_file.close()
        self._trace_file = None
        partial = self.record_trace + ".partial"
        if not self._trace_steps:
            log.warning("EPLB trace: no forward step ran; %s not written", self.record_trace)
            os.remove(partial)
            return
        from eplb.sim.traces import save_trace  # the simulator's own format

        load = np.memmap(partial, dtype=np.int64, mode="r",
                         shape=(self._trace_steps, self.num_layers, self.num_experts))
        with open(self.record_trace, "wb") as f:  # exactly this path (numpy adds .npz)
            save_trace(f, load)
        del load
        os.remove(partial)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (works for float8, where torch.equal has no CPU kernel)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
