"""``DPEngineClient``: the front process's handle on ``G`` DP rank processes (docs/interfaces.md).

It spawns one process per rank (torch.multiprocessing, spawn context), sends each new request to
the least-loaded rank, and streams that rank's ``RequestOutput``s back to the caller's asyncio
loop. A reader thread owns the shared output queue; it also notices a rank that died, after
which the client is unhealthy and every open stream raises.

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
from collections.abc import AsyncIterator
from typing import Any

import torch.multiprocessing as mp

from eplb.config import EPLBConfig, ParallelConfig
from eplb.runtime.dp_worker import RankSpec, rank_main
from eplb.parallel.groups import find_free_port, resolve_rendezvous, set_nccl_env

log = logging.getLogger("eplb.engine.dp")

_ABORTED = object()
STATS_TIMEOUT_S = 10.0


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
        size = parallel.data_parallel_size
        self.rendezvous = resolve_rendezvous(parallel)
        self.world_size = size
        if parallel.enable_expert_parallel and size > 1:
            from eplb.model.config import load_config

            experts = load_config(str(model_path)).num_experts
            redundant = eplb.num_redundant_experts if eplb is not None else 0
            if (experts + redundant) % size:
                raise ValueError(
                    f"data_parallel_size ({size}) must divide the physical expert count "
                    f"({experts} experts + num_redundant_experts {redundant})")
        # ranks of this node (multi-node: one client per node; requests are served by the ranks
        # of the node whose front received them)
        first = self.rendezvous.node_rank * self.rendezvous.local_size
        self.rank_ids = list(range(first, first + self.rendezvous.local_size))
        if self.rank_ids[-1] >= size:
            raise ValueError(f"node_rank {self.rendezvous.node_rank} has no ranks: "
                             f"data_parallel_size is {size}")
        self._procs: dict[int, Any] = {}
        self._in_qs: dict[int, Any] = {}
        self._out_q = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
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
    @property
    def tokenizer(self):
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
            proc = ctx.Process(target=rank_main, args=(spec, in_q, self._out_q),
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
                if msg[0] == "ready":
                    ready.add(msg[1])
                    self.rank_info[msg[1]] = msg[2]
                elif msg[0] == "error":
                    raise RuntimeError(f"DP rank {msg[1]} failed to start:\n{msg[2]}")
        except BaseException:
            self.shutdown()
            raise
        self._reader = threading.Thread(target=self._read, name="dp-client-reader", daemon=True)
        self._reader.start()

    def is_healthy(self) -> bool:
        return (self._started and not self._shut and self._error is None
                and all(p.is_alive() for p in self._procs.values()))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every rank process (idempotent). Ranks stop together at a step boundary; any
        that do not exit in time are terminated, then killed."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
            self._stopping = True
        for q in self._in_qs.values():
            try:
                q.put(("shutdown",))
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
        if self._reader is not None:
            self._reader.join(2.0)
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
        self, request_id: str, prompt_token_ids: list[int], params: Any
    ) -> AsyncIterator[Any]:
        """Stream ``RequestOutput``s of one request until it finishes (ValueError for a request
        the rank rejects, RuntimeError if the engine fails)."""
        if not self.is_healthy():
            raise RuntimeError(self._error or "the engine is not running")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            rank = self._pick_rank()
            self._streams[request_id] = (loop, q, rank)
            self._load[rank] += 1
        self._in_qs[rank].put(("add", request_id, [int(t) for t in prompt_token_ids], params))
        for other, iq in self._in_qs.items():  # idle ranks block on their queues: wake them
            if other != rank:
                iq.put(("wake",))
        finished = False
        try:
            while True:
                item = await q.get()
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
                self._in_qs[rank].put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        with self._lock:
            entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, q, rank = entry
        self._in_qs[rank].put(("abort", request_id))
        self._forget(request_id)
        loop.call_soon_threadsafe(q.put_nowait, _ABORTED)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            entry = self._streams.pop(request_id, None)
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
            q.put(("stats", token))
        event.wait(STATS_TIMEOUT_S)
        with self._lock:
            self._stats_waiters.pop(token, None)
        ranks = [replies[r] for r in sorted(replies)]
        out: dict[str, Any] = {"healthy": self.is_healthy(), "num_ranks": self.world_size,
                               "ranks": ranks}
        if ranks:
            first = ranks[0]
            for key, value in first.items():
                if key not in ("rank", "running", "waiting", "dummy_steps"):
                    out[key] = value
            out["running"] = sum(r["running"] for r in ranks)
            out["waiting"] = sum(r["waiting"] for r in ranks)
        return out

    # ----- the reader thread -----------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            entry = self._streams.get(request_id)
        if entry is not None:
            loop, q, _ = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self._deliver(rid, exc)

    def _read(self) -> None:
        while True:
            try:
                msg = self._out_q.get(timeout=0.5)
            except queue.Empty:
                if self._stopping:
                    return
                dead = [r for r, p in self._procs.items() if not p.is_alive()]
                if dead and self._error is None:
                    self._error = f"DP rank(s) {dead} died"
                    log.error("%s; failing open requests", self._error)
                    self._fail_all(RuntimeError(self._error))
                continue
            except (EOFError, OSError, ValueError):
                return
            kind = msg[0]
            if kind == "out":
                for out in msg[2]:
                    self._deliver(out.request_id, out)
            elif kind == "reject":
                self._deliver(msg[2], ValueError(msg[3]))
            elif kind == "stats":
                with self._lock:
                    waiter = self._stats_waiters.get(msg[2])
                if waiter is not None:
                    event, replies = waiter
                    replies[msg[1]] = msg[3]
                    if len(replies) == len(self.rank_ids):
                        event.set()
            elif kind == "error":
                self._error = f"DP rank {msg[1]} failed:\n{msg[2]}"
                log.error(self._error)
                self._fail_all(RuntimeError(self._error))
            elif kind == "exit" and not self._stopping:
                self._error = f"DP rank {msg[1]} exited"
