"""EPLB on one rank: the per-step protocol and every decision.

The rank's main loop drives it at every step boundary:

1. ``packet()`` -> this rank's part of the per-step all-reduce (SUM): a failure flag, rank 0's
   policy state, this rank's async readiness (one-hot over ranks) and the expert load of the
   previous forward ``[L, E]``.
2. ``on_boundary(summed, forward_before)`` with the reduced vector: records the global load,
   advances a rebalance in flight (broadcast of the new placement, commits of layers every rank
   has received, the next layer's transfer) or abandons it, and every ``step_interval`` forward
   steps starts one (sync: right here, all ranks together; async: ``AsyncRebalance``).
3. ``collect_step_load()`` after each forward.

Every decision is a function of the reduced vector and of counters that advance identically on
all ranks, so all ranks commit, abandon, trigger, broadcast and post transfers at the same step
boundary and in the same order. Local clocks only raise the failure flag, which the all-reduce
then spreads. Only the calling (main) thread ever enqueues a collective or P2P op.

After a failure the layers not yet committed keep the old placement on every rank (layers
committed before the failure stay on the new one: each committed layer is complete and
consistent on every rank).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from eplb.balancer.estimate import make_load_estimator
from eplb.balancer.gain import keep_worthwhile
from eplb.balancer.placement import Placement
from eplb.balancer.trigger import make_trigger
from eplb.config import EPLBConfig
from eplb.controller.async_rebalance import (
    POLICY_DONE,
    POLICY_FAILED,
    AsyncRebalance,
    PolicyJob,
)
from eplb.controller.faults import CommitVerifier, Fault, fault_for
from eplb.controller.load_recorder import LoadRecorder
from eplb.controller.metrics import EplbMetrics
from eplb.parallel.groups import DistContext
from eplb.parallel.transfer import PendingLayer, commit_layer, plan_bytes, start_layer_transfer

log = logging.getLogger("eplb.controller")

# packet layout: [failed, policy_state, ready[G], load[L*E]]
_FAILED, _POLICY, _READY = 0, 1, 2


def initial_placement(
    num_layers: int, num_experts: int, world_size: int, cfg: EPLBConfig | None
) -> Placement:
    """The placement the ranks load with: linear, redundant slots round-robin (the sizes were
    checked by ``ParallelConfig.check_expert_slots`` before any rank started)."""
    redundant = cfg.num_redundant_experts if cfg is not None else 0
    return Placement.default(num_layers, num_experts, world_size, redundant)


class EplbState:
    """Per-rank EPLB driver (see the module docstring).

    ``layers``: the model's MoE layers (``MoELayer`` contract). ``cfg`` None = EPLB off (the
    state then only records loads for ``record_trace``). ``progress(what)`` is called before
    each long or collective step of a rebalance (the rank's heartbeat).
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
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = cfg is not None
        self.cfg = cfg if cfg is not None else EPLBConfig()
        self.ctx = ctx
        self.layers = layers
        self.placement = placement
        self.num_layers = placement.num_layers
        self.num_experts = placement.num_experts
        self.collect = self.enabled or record_trace is not None
        self.recorder = LoadRecorder(
            make_load_estimator(self.cfg, self.num_layers, self.num_experts), self.num_layers,
            self.num_experts, record_trace if ctx.rank == 0 else None)
        self.trigger = make_trigger(self.cfg)
        self.metrics = EplbMetrics()
        self.verifier = CommitVerifier(checkpoint_path, self.metrics)
        self._progress = progress or (lambda what: None)
        self._pending = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        self._generation = 0
        self._inflight: AsyncRebalance | None = None
        self._fault_armed = True  # debug_fail_*: only the first rebalance fails
        self._policy = None
        # posted transfers of abandoned rebalances: kept alive until their ops complete
        self._orphans: list[PendingLayer] = []
        self._stream = (torch.cuda.Stream(ctx.device)
                        if ctx.device.type == "cuda" and self.enabled else None)
        self.synced_at_boundary = False  # a sync rebalance ran at the last boundary

    @property
    def steps(self) -> int:
        return self.recorder.steps

    # ----- per-step protocol -----------------------------------------------------------------
    @property
    def packet_size(self) -> int:
        g = self.ctx.world_size
        return _READY + g + (self.num_layers * self.num_experts if self.collect else 0)

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
            out[_READY + self.ctx.rank] = r.ready_count()
            why = r.failed_here(self.cfg.transfer_timeout_s)
            if why is not None:
                log.warning("EPLB rebalance %d on rank %d: %s", r.generation, self.ctx.rank, why)
                out[_FAILED] = 1
            out[_POLICY] = r.policy_state()
        if self.collect:
            out[_READY + g:] = self._pending.view(-1)
            self._pending.zero_()
        return out

    def on_boundary(self, summed: torch.Tensor, forward_before: bool) -> None:
        """Act on the reduced packet; ``forward_before``: the previous iteration ran a forward."""
        g = self.ctx.world_size
        summed = summed.to("cpu")
        self.synced_at_boundary = False
        step_balancedness = None
        if forward_before and self.collect:
            step_balancedness = self.recorder.record(
                summed[_READY + g:].view(self.num_layers, self.num_experts), self.placement)
        self._orphans = [p for p in self._orphans if not _finished(p)]
        if not self.enabled:
            return
        r = self._inflight
        if r is not None:
            if forward_before:
                r.count_step()
            self._advance(r, summed)
        if not forward_before:
            return
        if self.steps % self.cfg.step_interval == 0:
            self._close_interval()
        # a step without load (dummy forwards only) is no sign of imbalance
        self.trigger.observe(1.0 if step_balancedness is None else step_balancedness)
        decision = self.trigger.decide()
        if not decision.rebalance or self._inflight is not None:
            return
        if decision.fit_steps is not None:  # a load shift: fit on the steps since it only
            self.recorder.estimator.keep_last(decision.fit_steps)
        self.trigger.started(decision)
        # nothing to fit on an estimate without load (every rank sees the same total)
        if float(self.recorder.estimator.total().sum()) <= 0:
            return
        if self.cfg.use_async:
            self._start_async()
        else:
            self._rebalance_sync()
            self.synced_at_boundary = True

    # ----- async -----------------------------------------------------------------------------
    def _start_async(self) -> None:
        self._generation += 1
        fault = self._take_fault()
        if fault is not None:
            fault.freeze_here("policy")
        old = self.placement
        job = None
        if self.ctx.rank == 0:  # a snapshot: the estimator keeps recording meanwhile
            load, history = self._policy_inputs()
            job = PolicyJob(lambda: self._run_policy(load, old, history), fault)
        self._inflight = AsyncRebalance(generation=self._generation, old=old, policy=job,
                                        max_staged_layers=self.cfg.max_staged_layers,
                                        fault=fault)

    def _advance(self, r: AsyncRebalance, summed: torch.Tensor) -> None:
        """One boundary of the rebalance in flight; the same steps in the same order everywhere."""
        g = self.ctx.world_size
        if int(summed[_FAILED]) > 0:
            self._abandon(f"a rank reported a failed or timed-out rebalance (phase {r.phase})")
            return
        if r.phase == "policy":
            state = int(summed[_POLICY])
            if state == POLICY_FAILED:
                self._abandon("the policy failed on rank 0")
                return
            if state != POLICY_DONE:
                return
            self._progress("eplb: receive the new placement")
            new = self._broadcast_placement(r.policy.result if r.policy is not None else None)
            r.set_plan(new, self._plan(r.old, new))
            if r.policy is not None:
                self.metrics.record_policy(r.policy.seconds)
            if r.fault is not None:
                r.fault.freeze_here("transfer")
        else:
            ready = int(summed[_READY:_READY + g].min())
            while r.committed < ready:
                self._progress("eplb: commit a layer")
                layer, pending = r.take()
                self._commit(layer, pending, r.new, r.transfers[layer])
        if r.complete:
            self._inflight = None
            self._finish(r.started, r.copies, r.committed, r.steps_in_flight)
            return
        self._progress("eplb: post a layer's transfer")
        r.post_next(self.ctx.rank, self._tensors_of, self.placement.slots_per_rank,
                    self.ctx.transfer_group, self._stream)

    def _broadcast_placement(self, new: Placement | None) -> Placement:
        """Rank 0's ``phy2log`` to every rank (main thread, EP group)."""
        old = self.placement
        buf = torch.empty(tuple(old.phy2log.shape), dtype=torch.long, device=self.ctx.comm_device)
        if self.ctx.rank == 0:
            if new is None:
                buf.fill_(-1)
            else:
                buf.copy_(new.phy2log)
        dist.broadcast(buf, src=0, group=self.ctx.ep_group)
        phy2log = buf.to("cpu")
        if int(phy2log.min()) < 0:
            raise RuntimeError(f"EPLB policy {self.cfg.policy!r} failed on rank 0")
        return Placement.from_phy2log(phy2log, old.num_experts, old.num_ranks)

    def _abandon(self, why: str) -> None:
        r = self._inflight
        self._inflight = None
        r.cancel()
        kept = len(r.moving) - r.committed if r.phase == "transfer" else self.num_layers
        pending = [p for p in r.unfinished() if isinstance(p, PendingLayer)]
        self._orphans.extend(pending)
        # only a rank whose own posted ops may wait for a peer forever aborts the old group
        self._fail(f"{why}; {kept} layer(s) keep the old placement", r.committed, r.started,
                   r.copies, r.steps_in_flight,
                   abort_transfers=any(not _finished(p) for p in pending))

    # ----- sync ------------------------------------------------------------------------------
    def _rebalance_sync(self) -> None:
        """All ranks stop here, move every layer's experts, swap maps layer by layer."""
        started = time.monotonic()
        old = self.placement
        fault = self._take_fault()
        if fault is not None:
            fault.freeze_here("policy")
        self._progress("eplb: sync policy")
        new = None
        if self.ctx.rank == 0:
            t0 = time.monotonic()
            try:
                if fault is not None and fault.phase == "policy" and fault.mode == "raise":
                    raise fault.error("the policy raises on rank 0")
                load, history = self._policy_inputs()
                new = self._run_policy(load, old, history)
            except Exception as exc:  # noqa: BLE001 - the others must not wait forever
                log.warning("EPLB policy %r failed: %s", self.cfg.policy, exc)
            self.metrics.record_policy(time.monotonic() - t0)
        try:
            new = self._broadcast_placement(new)
        except RuntimeError as exc:
            self._fail(str(exc), 0, started, 0, 0)
            return
        transfers = self._plan(old, new)
        if fault is not None:
            fault.freeze_here("transfer")
        copies = committed = 0
        for layer, moved in enumerate(transfers):
            if not moved:
                continue
            self._progress(f"eplb: sync transfer of layer {layer}")
            pending, ok = None, 1
            try:
                if fault is not None and fault.phase == "transfer" and committed == 0:
                    if fault.mode == "stall":  # peers' P2P ops time out meanwhile
                        time.sleep(self.cfg.transfer_timeout_s)
                    raise fault.error(f"rank {self.ctx.rank} fails its transfer of layer {layer}")
                pending = start_layer_transfer(layer, moved, self.ctx.rank,
                                               self._tensors_of(layer),
                                               self.placement.slots_per_rank,
                                               self.ctx.transfer_group, self._stream)
                pending.wait(self.cfg.transfer_timeout_s)
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
                if pending is not None and not _finished(pending):
                    self._orphans.append(pending)
                self._fail(f"transfer of layer {layer} failed; {kept} layer(s) keep the old "
                           "placement", committed, started, copies, 0,
                           abort_transfers=pending is not None and not _finished(pending))
                return
            self._commit(layer, pending, new, moved)
            copies += len(moved)
            committed += 1
        self._finish(started, copies, committed, 0)

    # ----- shared steps ----------------------------------------------------------------------
    def _take_fault(self) -> Fault | None:
        if not self._fault_armed:
            return None
        self._fault_armed = False
        return fault_for(self.cfg, self.ctx.rank)

    def _policy_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate [L, E], the recent steps [K, L, E]) as of now, copied."""
        est = self.recorder.estimator
        return est.total().clone(), est.steps().clone()

    def _run_policy(self, load: torch.Tensor, old: Placement, history: torch.Tensor) -> Placement:
        """The policy on the estimate (with the recent steps as ``history``), then the layers
        whose predicted gain is below ``skip_gain_threshold`` keep the old placement."""
        if self._policy is None:
            from eplb.balancer.policies import get_policy

            self._policy = get_policy(self.cfg.policy)
        new = self._policy(load, old.num_ranks, old.num_redundant, previous=old,
                           max_moves=self.cfg.max_moves_per_rebalance, history=history)
        return keep_worthwhile(load, old, new, self.cfg.skip_gain_threshold)

    @staticmethod
    def _plan(old: Placement, new: Placement) -> list[list]:
        from eplb.balancer.planner import plan

        return plan(old, new)

    def _tensors_of(self, layer: int) -> dict[str, torch.Tensor]:
        return self.layers[layer].expert_tensors()

    def _commit(self, layer_idx: int, pending: PendingLayer, new: Placement,
                moved: list) -> None:
        """Write a received layer in place and swap its maps to ``new``'s (every rank, same
        boundary)."""
        tensors = self._tensors_of(layer_idx)
        staged = pending.finish()
        commit_layer(tensors, staged)
        phy2log = self.placement.phy2log.clone()
        phy2log[layer_idx] = new.phy2log[layer_idx]
        self.placement = Placement.from_phy2log(phy2log, self.num_experts, self.ctx.world_size)
        p = self.placement
        self.layers[layer_idx].set_placement(
            p.phy2log[layer_idx].clone(), p.log2phy[layer_idx].clone(),
            p.replica_count[layer_idx].clone(),
        )
        self.metrics.count_commit(len(moved), plan_bytes(moved, tensors))
        self.metrics.count_transfer(staged.bytes_received, pending.seconds(), staged.messages)
        if self.cfg.debug_verify_commits:
            self.verifier.verify_layer(layer_idx, self.layers[layer_idx], self.placement,
                                       self.ctx.rank)

    def _finish(self, started: float, copies: int, layers: int, steps_in_flight: int) -> None:
        m = self.metrics
        elapsed = time.monotonic() - started
        m.record_rebalance(elapsed, steps_in_flight, copies, layers, self.steps)
        if self.cfg.debug_verify_commits:
            self.verifier.verify_maps(self.placement, self.layers, self.ctx)
        if self.ctx.rank == 0:
            log.info("EPLB rebalance %d done in %.3fs (%d copies moved so far)",
                     m.rebalances, elapsed, m.copies_moved)

    def _fail(self, why: str, layers: int, started: float, copies: int, steps_in_flight: int,
              *, abort_transfers: bool = False) -> None:
        self.metrics.record_failure(why, time.monotonic() - started, steps_in_flight, copies, layers, self.steps)
        if self.ctx.rank == 0:
            log.warning("EPLB rebalance abandoned on every rank: %s", why)
        # The old transfer group may hold unmatched or timed-out messages: never reuse it.
        self._progress("eplb: new transfer group")
        self.ctx.renew_transfer_group(abort_old=abort_transfers)
        if self.cfg.debug_verify_commits:
            self.verifier.verify_maps(self.placement, self.layers, self.ctx)

    def _close_interval(self) -> None:
        value = self.recorder.close_interval()
        if value is None:
            return
        self.metrics.add_interval(value)
        if self.cfg.log_balancedness and self.ctx.rank == 0:
            log.info("EPLB step %d: balancedness %.4f (mean over layers and the last %d steps)",
                     self.steps, value, self.cfg.step_interval)

    # ----- checks and end --------------------------------------------------------------------
    def verify_layer(self, layer_idx: int) -> None:
        """Compare layer ``layer_idx``'s local slots with the checkpoint (counted in stats)."""
        self.verifier.verify_layer(layer_idx, self.layers[layer_idx], self.placement,
                                   self.ctx.rank)

    @property
    def rebalance_in_flight(self) -> bool:
        return self._inflight is not None

    def stats(self) -> dict:
        d = self.metrics.as_dict()
        d["eplb_steps"] = self.steps
        d["rebalance_in_flight"] = self.rebalance_in_flight
        if d["balancedness"] is None:
            d["balancedness"] = self.recorder.interval_so_far()
        return d

    def close(self) -> None:
        """Drain transfers every rank posted, drop a rebalance in flight, write the trace."""
        if self._inflight is not None:
            r, self._inflight = self._inflight, None
            r.cancel()
            self._orphans.extend(p for p in r.unfinished() if isinstance(p, PendingLayer))
        deadline = time.monotonic() + self.cfg.transfer_timeout_s
        for pending in self._orphans:
            try:
                pending.wait(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a dead peer's transfer: nothing to keep
                pass
        self._orphans.clear()
        self.recorder.close()


def _finished(pending: PendingLayer) -> bool:
    try:
        return pending.done()
    except Exception:  # noqa: BLE001 - a failed orphan is finished too
        return True
