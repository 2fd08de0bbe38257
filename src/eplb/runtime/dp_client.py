"""``DPEngineClient``: the front process's handle on ``G`` DP rank processes (docs/interfaces.md).

It spawns one process per rank (torch.multiprocessing, spawn context), sends each new request to
the least-loaded rank, and streams that rank's ``RequestOutput``s back to the caller's asyncio
loop. A reader thread owns the shared output queue. A monitor thread watches the local ranks:
a rank that died, or whose heartbeat (``eplb.runtime.heartbeat``) is older than
``stall_timeout_s``, makes the client broken for good: it logs every local rank's last
operation, every open stream raises, new requests are refused, and the ``on_fatal`` callbacks
run (``eplb serve`` then exits non-zero so a supervisor restarts it).

Ranks exit by themselves when the front process disappears (they watch their parent pid), so a
killed server leaves no orphan processes; ``shutdown()`` stops them cleanly and is idempotent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch.multiprocessing as mp

from eplb.config import EPLBConfig, ParallelConfig
from eplb.parallel.groups import find_free_port, resolve_rendezvous, set_nccl_env
from eplb.runtime.dp_worker import RankSpec, rank_main
from eplb.runtime.heartbeat import DEFAULT_STALL_TIMEOUT_S, Heartbeats
from eplb.runtime.mailbox import LatestOutput, put_all
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
    Wake,
)
from eplb.runtime.output_stream import DeltaDecoder, check_stream_interval

log = logging.getLogger("eplb.engine.dp")

_ABORTED = object()
STATS_TIMEOUT_S = 3.0  # a healthy rank answers at its next step boundary
MONITOR_PERIOD_S = 0.25


class DPEngineClient:
    """See docs/interfaces.md ("runtime")."""

    def __init__(
        self,
        model_path: str,
        engine_kwargs: dict,
        parallel: ParallelConfig,
        eplb: EPLBConfig | None,
        record_trace: str | None = None,
        *,
        num_threads: int | None = None,
        start_timeout_s: float = 600.0,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        if eplb is not None and not parallel.enable_expert_parallel:
            raise ValueError("eplb needs enable_expert_parallel=True (EPLB moves experts between "
                             "EP ranks)")
        self.model_path = str(model_path)
        self.engine_kwargs = dict(engine_kwargs)
        self.parallel = parallel
        self.eplb = eplb
        self.record_trace = record_trace
        self.num_threads = num_threads
        self.start_timeout_s = start_timeout_s
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        size = parallel.data_parallel_size
        self.rendezvous = resolve_rendezvous(parallel)
        self.world_size = size
        if parallel.enable_expert_parallel and size > 1:
            from eplb.model.config import load_config

            parallel.check_expert_slots(load_config(str(model_path)).num_experts,
                                        eplb.num_redundant_experts if eplb is not None else 0)
        # ranks of this node (multi-node: one client per node; requests are served by the ranks
        # of the node whose front received them)
        first = self.rendezvous.start_rank
        self.rank_ids = list(range(first, first + self.rendezvous.local_size))
        if self.rank_ids[-1] >= size:
            raise ValueError(f"data_parallel_start_rank {first} + data_parallel_size_local "
                             f"{self.rendezvous.local_size} exceeds data_parallel_size {size}")
        self._procs: dict[int, Any] = {}
        self._in_qs: dict[int, Any] = {}
        self._out_q = None
        self._reader: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        self._heartbeats: Heartbeats | None = None
        self._fatal_callbacks: list = []
        self.remote_stopped = False  # another node's front stopped the job
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, LatestOutput, int]] = {}
        self._outputs = DeltaDecoder()  # the ranks send deltas; under _lock
        self._load = {r: 0 for r in self.rank_ids}
        self._rr = itertools.count()
        self._stats_waiters: dict[int, tuple[threading.Event, dict]] = {}
        self._stats_token = itertools.count()
        self._error: str | None = None
        self._started = False
        self._stopping = False
        self._shut = False
        self._tokenizer = None
        self.rank_info: dict[int, dict] = {}

    # ----- life cycle ------------------------------------------------------------------------
    def on_fatal(self, callback: Callable[[str], None]) -> None:
        """Run ``callback(reason: str)`` once if the engine breaks (a rank died or hung) or
        another node stops the job (then ``remote_stopped`` is True)."""
        self._fatal_callbacks.append(callback)

    @property
    def error(self) -> str | None:
        """Why the engine broke (None while it is healthy or after a clean stop)."""
        return self._error

    @property
    def tokenizer(self) -> Any | None:
        if self._tokenizer is None:
            from eplb.engine.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def start(self) -> None:
        """Spawn the rank processes; return when every local rank is ready (RuntimeError if one
        fails to start, with its traceback)."""
        if self._started:
            return
        self._started = True
        device = str(self.engine_kwargs.get("device", "cpu"))
        if device.startswith("cuda"):
            set_nccl_env()  # inherited by every rank process
        address = self.rendezvous.address
        port = self.rendezvous.port or find_free_port(address)
        ctx = mp.get_context("spawn")
        self._out_q = ctx.Queue()
        self._heartbeats = Heartbeats(ctx, self.rank_ids)
        level = logging.getLogger().getEffectiveLevel()
        for i, rank in enumerate(self.rank_ids):
            spec = RankSpec(
                rank=rank, world_size=self.world_size, local_rank=i,
                model_path=self.model_path, engine_kwargs=self.engine_kwargs,
                parallel=self.parallel, eplb=self.eplb, record_trace=self.record_trace,
                address=address, port=port, parent_pid=os.getpid(),
                num_threads=self.num_threads, log_level=level,
            )
            in_q = ctx.Queue()
            proc = ctx.Process(target=rank_main,
                               args=(spec, in_q, self._out_q, self._heartbeats.writer(rank)),
                               name=f"eplb-dp-rank{rank}", daemon=True)
            proc.start()
            self._procs[rank], self._in_qs[rank] = proc, in_q
        ready: set[int] = set()
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while len(ready) < len(self.rank_ids):
                try:
                    msg = self._out_q.get(timeout=0.5)
                except queue.Empty:
                    dead = [r for r, p in self._procs.items() if not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"DP rank(s) {dead} exited during start-up") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"DP ranks not ready after {self.start_timeout_s:.0f}s") from None
                    continue
                if isinstance(msg, RankReady):
                    ready.add(msg.rank)
                    self.rank_info[msg.rank] = msg.info
                elif isinstance(msg, RankError):
                    raise RuntimeError(f"DP rank {msg.rank} failed to start:\n{msg.text}")
        except BaseException:
            self.shutdown()
            raise
        self._reader = threading.Thread(target=self._read, name="dp-client-reader", daemon=True)
        self._reader.start()
        self._monitor = threading.Thread(target=self._watch, name="dp-client-monitor",
                                         daemon=True)
        self._monitor.start()

    def is_healthy(self) -> bool:
        return self._serving() and all(p.is_alive() for p in self._procs.values())

    def _serving(self) -> bool:
        """Started, not shut down, not broken. Rank deaths reach ``_error`` through the monitor
        thread within MONITOR_PERIOD_S (and fail every open request then), so a new request
        checks only this, not each process (a wait syscall per rank per request)."""
        return self._started and not self._shut and self._error is None and not self.remote_stopped

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every rank process (idempotent). Ranks stop together at a step boundary; any
        that do not exit in time are terminated, then killed."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
            self._stopping = True
        if self._error is not None:  # hung or dead ranks never reach a boundary: do not wait
            timeout_s = 0.0
        for q in self._in_qs.values():
            try:
                q.put(Shutdown())
            except (ValueError, OSError):
                pass
        deadline = time.monotonic() + timeout_s
        for p in self._procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs.values():
            if p.is_alive():
                p.terminate()
        for p in self._procs.values():
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for thread in (self._reader, self._monitor):
            if thread is not None and thread is not threading.current_thread():
                thread.join(2.0)
        self._fail_all(RuntimeError("the engine was shut down"))
        for q in [*self._in_qs.values(), self._out_q]:
            if q is not None:
                q.close()
                q.cancel_join_thread()

    def __enter__(self) -> "DPEngineClient":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----- requests --------------------------------------------------------------------------
    def _pick_rank(self) -> int:
        """Least-loaded rank (requests in flight); ties go round-robin."""
        turn = next(self._rr)
        n = len(self.rank_ids)
        return min(self.rank_ids, key=lambda r: (self._load[r], (r - turn) % n))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: Any, *,
        stream_interval: int | None = 1,
    ) -> AsyncIterator[Any]:
        """Stream ``RequestOutput``s of one request until it finishes (ValueError for a request
        the rank rejects, RuntimeError if the engine fails). Outputs are cumulative; a caller
        that falls behind gets the newest one (``eplb.runtime.mailbox``), the finished one always.
        ``stream_interval``: the rank sends an output with the first token, then every N new
        tokens, and the final one; None: the final one only (a caller that does not stream)."""
        check_stream_interval(stream_interval)
        if not self._serving():
            raise RuntimeError(self._error or "the engine is not running")
        loop = asyncio.get_running_loop()
        box = LatestOutput()
        prompt = [int(t) for t in prompt_token_ids]
        with self._lock:
            if self._error is not None:  # broke after the check above: _fail_all has run
                raise RuntimeError(self._error)
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            rank = self._pick_rank()
            self._streams[request_id] = (loop, box, rank)
            self._outputs.start(request_id, prompt)
            self._load[rank] += 1
        self._in_qs[rank].put(AddRequest(request_id, prompt, params, stream_interval))
        for other, iq in self._in_qs.items():  # idle ranks block on their queues: wake them
            if other != rank:
                iq.put(Wake())
        finished = False
        try:
            while True:
                item = await box.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = bool(item.finished)
                yield item
                if finished:
                    return
        finally:
            self._forget(request_id)
            if not finished and not self._shut:
                self._in_qs[rank].put(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        with self._lock:
            entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, box, rank = entry
        self._in_qs[rank].put(AbortRequest(request_id))
        self._forget(request_id)
        loop.call_soon_threadsafe(box.put, _ABORTED, True)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            entry = self._streams.pop(request_id, None)
            self._outputs.forget(request_id)
            if entry is not None:
                self._load[entry[2]] -= 1

    # ----- stats -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-rank running/waiting counts and the EPLB figures (identical on every rank, taken
        from the first); blocks until every rank answered (at most one step's time)."""
        if not self.is_healthy():
            return {"healthy": False, "ranks": []}
        token = next(self._stats_token)
        event, replies = threading.Event(), {}
        with self._lock:
            self._stats_waiters[token] = (event, replies)
        for q in self._in_qs.values():
            q.put(StatsQuery(token))
        event.wait(STATS_TIMEOUT_S)
        with self._lock:
            self._stats_waiters.pop(token, None)
        ranks = [replies[r] for r in sorted(replies)]
        out: dict[str, Any] = {"healthy": self.is_healthy(), "num_ranks": self.world_size,
                               "ranks": ranks}
        if ranks:
            first = ranks[0]
            for key, value in first.items():
                # per-rank figures stay under "ranks" (static_steps is the same on every rank)
                if key not in ("rank", "running", "waiting", "dummy_steps", "static_dummy_steps",
                               "eager_decode_steps", "requests_added"):
                    out[key] = value
            for key in ("running", "waiting", "requests_added"):  # totals over the ranks
                out[key] = sum(r.get(key, 0) for r in ranks)
        return out

    # ----- the reader thread -----------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            entry = self._streams.get(request_id)
        if entry is not None:
            self._post(entry[0], [(entry[1], item, True)])  # errors end the stream

    def _deliver_step(self, msg: RankOutputs) -> None:
        """One step's outputs of a rank, with one wake-up per event loop (not one per request)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for delta in msg.outputs:
                out = self._outputs.apply(delta)
                entry = self._streams.get(delta.request_id)
                if out is not None and entry is not None:  # None: aborted meanwhile
                    batches.setdefault(entry[0], []).append((entry[1], out, bool(out.finished)))
        for loop, items in batches.items():
            self._post(loop, items)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
        """Hand (mailbox, item, final) triples to their event loop, one wake-up for all."""
        try:
            loop.call_soon_threadsafe(put_all, items)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self._deliver(rid, exc)

    def _break(self, reason: str) -> None:
        """The engine is broken for good: log, fail every open stream, run the callbacks."""
        with self._lock:
            if self._error is not None or self._stopping:
                return
            self._error = reason
        log.error("%s; failing every open request", reason)
        self._fail_all(RuntimeError(reason))
        self._run_fatal(reason)

    def _run_fatal(self, reason: str) -> None:
        for callback in self._fatal_callbacks:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - one bad callback must not hide the others
                log.exception("on_fatal callback failed")

    def _watch(self) -> None:
        """Monitor thread: dead ranks and stalled heartbeats (see the module docstring)."""
        while not self._stopping and self._error is None:
            time.sleep(MONITOR_PERIOD_S)
            if self._stopping:
                return
            dead = [r for r, p in self._procs.items() if not p.is_alive()]
            if dead:
                time.sleep(MONITOR_PERIOD_S)  # let the reader take its last message first
                if not self._stopping and not self.remote_stopped:
                    codes = {r: self._procs[r].exitcode for r in dead}
                    self._break(f"DP rank(s) {dead} died (exit codes {codes})")
                return
            stalls = self._heartbeats.stalled(self.stall_timeout_s)
            if stalls:
                detail = "; ".join(s.describe() for s in stalls)
                self._break(f"the serving group is hung (no progress for more than "
                            f"{self.stall_timeout_s:g}s): {detail}")
                return

    def _read(self) -> None:
        while True:
            try:
                msg = self._out_q.get(timeout=0.5)
            except queue.Empty:
                if self._stopping or self._error is not None:
                    return
                continue
            except (EOFError, OSError, ValueError):
                return
            if isinstance(msg, RankOutputs):
                self._deliver_step(msg)
            elif isinstance(msg, RequestRejected):
                self._deliver(msg.request_id, ValueError(msg.message))
            elif isinstance(msg, StatsReply):
                with self._lock:
                    waiter = self._stats_waiters.get(msg.token)
                if waiter is not None:
                    event, replies = waiter
                    replies[msg.rank] = msg.stats
                    if len(replies) == len(self.rank_ids):
                        event.set()
            elif isinstance(msg, RankError):
                self._break(f"DP rank {msg.rank} failed:\n{msg.text}")
            elif isinstance(msg, RankExit) and not self._stopping:
                if not msg.stopped_here:  # another node's front stopped the job: a clean end
                    if not self.remote_stopped:
                        self.remote_stopped = True
                        log.info("another node stopped the job; this node stops too")
                        self._fail_all(RuntimeError("the job was stopped by another node"))
                        self._run_fatal("the job was stopped by another node")
                else:
                    self._break(f"DP rank {msg.rank} exited")
