"""The process of one DP rank: an ``EngineCore`` holding this rank's expert slots, in lockstep
with the other ranks.

Loop, one iteration per step boundary:

1. take the front's messages (new requests, aborts, stats queries, shutdown); a rank that had
   nothing to do anywhere last time blocks on its queue briefly instead of spinning;
2. schedule this rank's next batch (``EngineCore.schedule_step``), then one all-reduce (SUM) over
   the EP group of ``[has_work, stop, prefill, decodes[G], eplb packet]``: whether any rank has
   work, whether the front asked to stop, whether any rank's batch has a prefill chunk, each
   rank's decode count (one entry per rank, so the maximum is exact), and EPLB's
   failure/readiness flags and the previous forward's expert load (see ``eplb.controller.state``);
3. EPLB acts on it (record load, commit ready layers, abandon, trigger a rebalance);
4. if any rank has work, every rank runs one forward: ``step()`` with work, ``dummy_step()``
   without (the MoE collectives need every rank), then outputs go back to the front. With EP and
   a decode graph path (``step_plan``): when no rank has a prefill, every rank runs the graph of
   one padded size (a capture size >= the largest decode count), a rank without work too.

Messages (``eplb.runtime.messages``) front -> rank: ``AddRequest``, ``AbortRequest``,
``StatsQuery``, ``Wake``, ``Shutdown``. Rank -> front: ``RankReady``, ``RankOutputs``,
``RequestRejected``, ``StatsReply``, ``RankError``, ``RankExit``.

Before each blocking step the loop beats its heartbeat (``eplb.runtime.heartbeat``) with the
operation's name, so the front can tell a hung rank and name what it hung in.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from eplb.config import EPLBConfig, ParallelConfig
from eplb.kernels import compile_log
from eplb.runtime.heartbeat import HeartbeatWriter
from eplb.runtime.messages import (
    AbortRequest,
    AddRequest,
    RankError,
    RankExit,
    RankOutputs,
    RankReady,
    RequestRejected,
    Shutdown,
    StatsQuery,
    StatsReply,
)

log = logging.getLogger("eplb.engine.dp")

# per-step all-reduce header: [has_work, stop, prefill, decodes[G]]; the EPLB packet follows
_HAS_WORK, _STOP, _PREFILL, _DECODES = 0, 1, 2, 3

IDLE_WAIT_S = 0.1  # how long an idle rank blocks on its queue before the next idle all-reduce
INFLIGHT_IDLE_WAIT_S = 0.01  # shorter while an async rebalance waits for a commit boundary
# a boundary+forward slower than this is logged (a compile inside serving, a stalled peer)
SLOW_STEP_S = 1.0


@dataclass
class RankSpec:
    """Everything a rank process needs (pickled to the spawned process)."""

    rank: int
    world_size: int
    local_rank: int
    model_path: str
    engine_kwargs: dict[str, Any]
    parallel: ParallelConfig
    eplb: EPLBConfig | None
    record_trace: str | None
    address: str
    port: int
    parent_pid: int
    num_threads: int | None = None
    log_level: int = logging.INFO


def exit_with_parent(parent_pid: int) -> None:
    """Leave no orphans: exit as soon as the front process is gone (even if it was SIGKILLed)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Inbox(Protocol):
    """Where a rank reads the front's messages (a multiprocessing queue; a queue.Queue offline)."""

    def get(self, block: bool = True, timeout: float | None = None) -> object: ...

    def get_nowait(self) -> object: ...


class Outbox(Protocol):
    """Where a rank puts its messages to the front (a multiprocessing queue; a collector offline)."""

    def put(self, msg: object) -> None: ...


def rank_main(spec: RankSpec, in_q: Inbox, out_q: Outbox, heartbeat: HeartbeatWriter | None = None) -> None:
    """Entry point of a rank process."""
    # The front owns shutdown: a terminal's Ctrl-C reaches the whole process group, and a rank
    # killed by it mid-step would leave its peers in a collective and its trace unwritten.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(spec.parent_pid)
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    try:
        worker = RankWorker(spec, out_q, heartbeat)
    except BaseException:  # noqa: BLE001 - the front reports it
        out_q.put(RankError(spec.rank, traceback.format_exc()))
        return
    out_q.put(RankReady(spec.rank, worker.info()))
    try:
        stopped_here = worker.loop(in_q)
    except BaseException:  # noqa: BLE001
        out_q.put(RankError(spec.rank, traceback.format_exc()))
        os._exit(1)  # peers are stuck in a collective; the front tears everything down
    finally:
        worker.close()
    out_q.put(RankExit(spec.rank, stopped_here))


class RankWorker:
    """One DP rank: engine + EP dispatcher + EPLB state."""

    def __init__(self, spec: RankSpec, out_q: Outbox, heartbeat: HeartbeatWriter | None = None) -> None:
        """Joins the job (or reuses the process group already joined) and loads this rank's
        part of the model."""
        from eplb.controller.state import EplbState, initial_placement
        from eplb.engine.core import EngineCore
        from eplb.model.config import load_config
        from eplb.parallel.all2all import make_dispatcher
        from eplb.parallel.groups import init_distributed
        from eplb.runtime.output_stream import DeltaEncoder

        self.spec = spec
        self.out_q = out_q
        self._deltas = DeltaEncoder()  # outputs go to the front as deltas
        self._unsent: list = []  # the last step's outputs, sent during the next forward
        self._heartbeat = heartbeat
        self.steps = 0  # forward steps (every rank runs the same number)
        self.beat("starting")
        self.rank = spec.rank
        self.world_size = spec.world_size
        kwargs = dict(spec.engine_kwargs)
        device = kwargs.get("device", "cpu")
        timeout = spec.eplb.transfer_timeout_s if spec.eplb is not None else 60.0
        self.ctx = init_distributed(
            spec.rank, spec.world_size, address=spec.address, port=spec.port, device=device,
            local_rank=spec.local_rank, transfer_timeout_s=timeout,
        )
        if self.ctx.device.type == "cuda":
            kwargs["device"] = str(self.ctx.device)
        cfg = load_config(spec.model_path)
        ep = spec.parallel.enable_expert_parallel and spec.world_size > 1
        self.ep = ep
        ep_size = spec.world_size if ep else 1
        placement = initial_placement(cfg.num_moe_layers, cfg.num_experts, ep_size,
                                      spec.eplb if ep else None)
        self.engine = EngineCore(spec.model_path, ep_rank=spec.rank if ep else 0, ep_size=ep_size,
                                 phy2log=placement.phy2log, **kwargs)
        # text is detokenized in _send_outputs, while the next forward runs on the device
        self.engine.defer_detokenization()
        self.layers = self.engine.model.moe_layers()
        self.dispatcher = None
        if ep:
            self.dispatcher = make_dispatcher(spec.parallel.all2all_backend, self.ctx.ep_group,
                                              spec.world_size, self.ctx.comm_device)
            for layer in self.layers:
                layer.install_dispatcher(self.dispatcher)
                if spec.eplb is not None:
                    layer.set_replica_dispatch(spec.eplb.replica_dispatch)
        self.state = EplbState(spec.eplb if ep else None, self.ctx, self.layers, placement,
                               record_trace=spec.record_trace,
                               # dummy weights have no checkpoint to verify commits against
                               checkpoint_path=(None if kwargs.get("load_format") == "dummy"
                                                else spec.model_path),
                               progress=self.beat)
        if ep:  # every rank must capture (and pad to) the same sizes: one startup collective
            slots = torch.tensor([self.engine.kv.num_slots], device=self.ctx.comm_device)
            dist.all_reduce(slots, op=dist.ReduceOp.MAX, group=self.ctx.ep_group)
            self.engine.set_graph_max_batch(int(slots))
        # graphs + the kernels of eager steps, before serving; no-op on CPU and eager. With EP the
        # capture and the warm-up forwards run the EP collectives: every rank does them here, in
        # the same order
        if self.ctx.device.type == "cuda":  # (triton is not imported on CPU ranks)
            compile_log.install()  # before the warm-up: its compiles are counted too
        compiled = compile_log.count()
        self.engine.warm_up()
        log.info("rank %d: warm-up done (%d Triton compile(s))", self.rank, compile_log.count() - compiled)
        self.dummy_steps = 0
        self.static_steps = 0  # forwards on the padded decode graph path (replays on CUDA)
        self.static_dummy_steps = 0  # of those, with no real row here
        self.eager_decode_steps = 0  # decode-only batches run eagerly (a peer prefilled, no graphs)
        # (kind, own decode rows, padded size or 0) per EP forward when a list (tests turn it on);
        # kind: static, static-dummy, eager-prefill, eager-decode, eager-dummy
        self.mode_log: list[tuple[str, int, int]] | None = None
        self.requests_added = 0
        # (seconds, phase) of every iteration that ran a forward, boundary included; phase is
        # "steady", "sync" (a sync rebalance ran at its boundary) or "async" (one in flight).
        # None = not recorded (benchmarks turn it on).
        self.step_log: list[tuple[float, str]] | None = None
        self._closed = False

    def record(self, *, steps: bool = False, modes: bool = False) -> None:
        """Start keeping ``step_log`` (per-iteration seconds and phase) and/or ``mode_log`` (the
        path each EP forward took): off by default, for benchmarks and tests."""
        if steps:
            self.step_log = []
        if modes:
            self.mode_log = []

    def beat(self, operation: str) -> None:
        """Tell the front which operation this rank is about to run (see heartbeat.py)."""
        if self._heartbeat is not None:
            self._heartbeat.beat(operation, self.steps)

    def info(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "num_moe_layers": len(self.layers),
                "device": str(self.ctx.device)}

    # ----- messages --------------------------------------------------------------------------
    def _handle(self, msg: object) -> bool:
        """Apply one front message; True when it asks to stop."""
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
                self._deltas.start(msg.request_id, msg.stream_interval)
                self.requests_added += 1
            except ValueError as exc:
                self.out_q.put(RequestRejected(self.rank, msg.request_id, str(exc)))
        elif isinstance(msg, AbortRequest):
            self.engine.abort_request(msg.request_id)
            self._unsent = [o for o in self._unsent if o.request_id != msg.request_id]
            self._deltas.forget(msg.request_id)
        elif isinstance(msg, StatsQuery):
            self.out_q.put(StatsReply(self.rank, msg.token, self.stats()))
        elif isinstance(msg, Shutdown):
            return True
        return False

    def _drain(self, in_q, block_s: float) -> bool:
        stop = False
        try:
            msg = in_q.get(timeout=block_s) if block_s > 0 else in_q.get_nowait()
            stop |= self._handle(msg)
            while True:
                stop |= self._handle(in_q.get_nowait())
        except queue.Empty:
            pass
        return stop

    def stats(self) -> dict:
        sched = self.engine.scheduler
        d = {"rank": self.rank, "running": len(sched.running), "waiting": len(sched.waiting),
             "steps": self.steps, "dummy_steps": self.dummy_steps,
             "requests_added": self.requests_added, "static_steps": self.static_steps,
             "static_dummy_steps": self.static_dummy_steps,
             "eager_decode_steps": self.eager_decode_steps, "steps_ahead": self.engine.steps_ahead}
        d.update(self.state.stats())
        return d

    # ----- the loop --------------------------------------------------------------------------
    def loop(self, in_q: Inbox, *, exit_when_idle: bool = False) -> bool:
        """Serve until a front asks to stop; returns True if this rank's front asked (False:
        another node's). ``exit_when_idle`` (offline drivers and tests): also return at the
        first boundary where no rank has work and no rebalance is in flight (every rank sees
        the same reduced vector, so all return together)."""
        forward_before = False
        anyone_busy = True  # first round: do not block
        stop = False
        while True:
            idle_here = not self.engine.has_unfinished_requests()
            if not anyone_busy and idle_here:
                wait = INFLIGHT_IDLE_WAIT_S if self.state.rebalance_in_flight else IDLE_WAIT_S
            else:
                wait = 0.0
            self.beat("idle wait")
            stop |= self._drain(in_q, wait)
            t0 = time.perf_counter()
            compiles0 = compile_log.count()
            has_work = self.engine.has_unfinished_requests()
            decodes, prefill = self.engine.schedule_step() if has_work else (0, False)
            header = torch.zeros(_DECODES + self.world_size, dtype=torch.long)
            header[_HAS_WORK], header[_STOP], header[_PREFILL] = int(has_work), int(stop), int(prefill)
            header[_DECODES + self.rank] = decodes
            vec = torch.cat([header, self.state.packet()])
            if self.world_size > 1:
                # alone, the sum is this rank's vector: no collective, and on NCCL no host wait
                # for the GPU (the step launched ahead by async scheduling keeps running)
                self.beat("step all-reduce")
                vec = vec.to(self.ctx.comm_device)
                dist.all_reduce(vec, group=self.ctx.ep_group)
                vec = vec.cpu()
            self.beat("eplb")
            self.state.on_boundary(vec[_DECODES + self.world_size:], forward_before)
            if int(vec[_STOP]) > 0:
                self.beat("stopping")
                self._send_outputs()
                return stop
            anyone_busy = int(vec[_HAS_WORK]) > 0
            forward_before = anyone_busy
            if not anyone_busy:
                self._send_outputs()
                if exit_when_idle and not self.state.rebalance_in_flight:
                    return True
                continue
            self.beat("forward")
            for layer in self.layers:  # spread replica choice over ranks and steps
                layer.set_replica_offset(self.steps * self.world_size + self.rank)
            if self.dispatcher is not None:
                self.dispatcher.begin_step()
            pad_to = self.step_plan(vec)
            if has_work:
                # the previous step's outputs go out while this forward runs on the device
                outs = self.engine.step(pad_to, on_launched=self._send_outputs)
            else:
                if self.ep:  # without EP the forward has no collectives to line up
                    self.engine.dummy_step(pad_to)
                    self.dummy_steps += 1
                self._send_outputs()
                outs = []
            self._count_mode(has_work, decodes, prefill, pad_to)
            self.steps += 1
            self.state.collect_step_load()
            elapsed = time.perf_counter() - t0
            if elapsed > SLOW_STEP_S:
                compiled = compile_log.since(compiles0)
                log.warning("rank %d: step %d took %.2f s (own decode rows %d, prefill %s, padded to %s; "
                            "%d Triton compile(s)%s)", self.rank, self.steps, elapsed, decodes, prefill, pad_to,
                            len(compiled), f": {', '.join(compiled)}" if compiled else "")
            if self.step_log is not None:
                phase = ("sync" if self.state.synced_at_boundary
                         else "async" if self.state.rebalance_in_flight else "steady")
                self.step_log.append((elapsed, phase))
            self._unsent = outs

    def _send_outputs(self) -> None:
        """Detokenize and send the last step's outputs to the front (as deltas), if not sent
        yet. Called while the next forward runs (``EngineCore.step``'s ``on_launched``, or beside
        a dummy step), or at a boundary with no forward (no rank busy: the loop may then wait;
        stop), so no output waits longer than one step."""
        self.engine.render_text()  # the text of the outputs about to go (deferred in the step)
        outs, self._unsent = self._unsent, []
        deltas = [d for d in map(self._deltas.encode, outs) if d is not None]  # None: held back
        if deltas:
            self.out_q.put(RankOutputs(self.rank, deltas))

    def step_plan(self, vec: torch.Tensor) -> int | None:
        """From the reduced header: the padded decode size every rank runs this step, or None
        (eager everywhere: no EP, some rank has a prefill chunk, no graph path, or more decodes
        than the largest graph). A function of the reduced vector only, so all ranks agree."""
        if not self.ep or int(vec[_PREFILL]) > 0:
            return None
        most = int(vec[_DECODES : _DECODES + self.world_size].max())
        return self.engine.graph_batch_size(most) if most > 0 else None

    def _count_mode(self, has_work: bool, decodes: int, prefill: bool, pad_to: int | None) -> None:
        """Count (and log) how this EP forward ran; without EP a rank picks its own graphs."""
        if not self.ep:
            return
        if pad_to is not None:
            self.static_steps += 1
            self.static_dummy_steps += int(decodes == 0)
            kind = "static" if decodes else "static-dummy"
        elif not has_work:
            kind = "eager-dummy"
        elif prefill:
            kind = "eager-prefill"
        else:  # decode-only here, but a peer prefilled (or no graph path / too many rows)
            kind = "eager-decode"
            self.eager_decode_steps += 1
        if self.mode_log is not None:
            self.mode_log.append((kind, decodes, pad_to or 0))

    def close(self, *, leave_group: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        from eplb.parallel.groups import destroy

        try:
            self.state.close()
        finally:
            if leave_group:
                destroy()
