"""EngineCore: one process, one model; add requests, step, get outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eplb.engine.detokenizer import IncrementalDetokenizer
from eplb.engine.kv_cache import KVCache
from eplb.engine.prompt import check_prompt_ids
from eplb.engine.sampling import Sampler, SampleRow, SamplingParams, TokenLogprob, token_logprobs
from eplb.engine.scheduler import ScheduledBatch, Scheduler, Sequence
from eplb.engine.tokenizer import load_tokenizer
from eplb.model.attention import AttentionMetadata, long_tensor
from eplb.model.dummy import router_skew
from eplb.model.loader import load_model, resolve_dtype


@dataclass
class _Launched:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]  # the rows that sample, in order
    tokens: torch.Tensor  # [n] sampled ids, on the device
    host: torch.Tensor  # their copy in host memory (pinned on CUDA), complete once ``ready`` passed
    ready: torch.cuda.Event | None
    prefill: bool = False  # the step carries a prefill chunk


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated so far
    text: str  # all generated so far
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None
    # one per generated token when SamplingParams.logprobs is set, else None
    logprobs: list[TokenLogprob] | None = None
    # one per prompt token (None for the first) when SamplingParams.prompt_logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _nothing() -> None:
    pass


# mixed steps of up to this many tokens replay from CUDA graphs by default (see _graph_rows_fit)
DEFAULT_MAX_GRAPH_TOKENS = 2048
# ... when their prefill rows read at most this many keys in all (sum over chunks of tokens x
# keys): in a graph each prefill token attends through the decode kernel, which reads its keys
# again per token (from L2: for a fresh 512-token prompt, 48 layers, about 2 ms on an H100),
# where eager prefill attention reads them once
MAX_GRAPH_PREFILL_KEY_READS = 1 << 20


class EngineCore:
    """See docs/interfaces.md (engine). ``kv_cache_memory_bytes`` caps the KV cache; the
    number of slots (concurrent sequences) is min(max_num_seqs, what fits)."""

    def __init__(
        self, model_path: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
        max_model_len: int | None = None, max_num_seqs: int = 32, max_num_batched_tokens: int = 2048,
        seed: int = 0, ep_rank: int = 0, ep_size: int = 1, phy2log: torch.Tensor | None = None,
        kv_cache_memory_bytes: int | None = None, enforce_eager: bool = False,
        quantization: str | None = None, load_format: str = "auto",
        dummy_router_skew: float | None = None, dummy_router_drift: int | None = None,
        dummy_router_trace: str | None = None,
        static_decode: bool = False, skip_tokenizer_init: bool = False, max_graph_tokens: int | None = None,
        async_scheduling: bool = True,
    ):
        from eplb.model.config import load_config

        cfg = load_config(model_path)
        if max_model_len is None:
            max_model_len = min(cfg.max_position_embeddings, 4096)
        for name, v, lo in (("max_model_len", max_model_len, 2), ("max_num_seqs", max_num_seqs, 1),
                            ("max_num_batched_tokens", max_num_batched_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if max_graph_tokens is not None and (isinstance(max_graph_tokens, bool) or not isinstance(max_graph_tokens, int)
                                             or max_graph_tokens < 1):
            raise ValueError(f"max_graph_tokens must be an integer >= 1, got {max_graph_tokens!r}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})"
            )
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.model, self.config = load_model(
            model_path, dtype=self.dtype, device=self.device, ep_rank=ep_rank, ep_size=ep_size,
            phy2log=phy2log, max_len=max_model_len, quantization=quantization, load_format=load_format,
            seed=seed, router_skew=router_skew(dummy_router_skew, dummy_router_drift, seed, dummy_router_trace),
        )
        # skip_tokenizer_init (vLLM's name): token ids in and out only, no detokenization
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(model_path)
        cfg = self.config
        per_slot = KVCache.bytes_per_slot(
            num_layers=cfg.num_layers, max_len=max_model_len, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, dtype=self.dtype,
        )
        slots = max_num_seqs
        if kv_cache_memory_bytes is not None:
            slots = min(slots, kv_cache_memory_bytes // per_slot)
            if slots < 1:
                raise ValueError(
                    f"kv_cache_memory_bytes={kv_cache_memory_bytes} holds no sequence of "
                    f"max_model_len={max_model_len}; need at least {per_slot}"
                )
        self.kv = KVCache(
            num_layers=cfg.num_layers, num_slots=slots, max_len=max_model_len,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=self.dtype, device=self.device,
        )
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens)
        # generators live on the logits' device, so sampling never copies probabilities to the host
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_token_ids = set(cfg.eos_token_ids)
        # ids past the tokenizer's size are embedding padding: never sampled
        valid = cfg.vocab_size if self.tokenizer is None else min(cfg.vocab_size, len(self.tokenizer))
        self.sampler = Sampler(valid, self.eos_token_ids, self.kv.num_slots, self.device, self.generator)
        self._seqs: dict[str, Sequence] = {}
        # CUDA graphs of decode steps (see eplb.engine.cuda_graphs): captured at the first
        # decode-only step (or at warm_up), when the runtime has installed its dispatchers.
        # static_decode: run decode-only steps through the graphs' padded static forward even
        # where nothing is captured (CPU, enforce_eager): how the tests prove the graph path,
        # DP+EP included, without a GPU
        self.enforce_eager = bool(enforce_eager)
        self.static_decode = bool(static_decode)
        self._graphs = None
        self._graphs_checked = False
        self._graph_max_batch = self.kv.num_slots
        # the largest step (tokens) run from the graphs: mixed steps of decodes and short
        # prefill chunks up to this size replay too (vLLM's max_cudagraph_capture_size)
        self._graph_max_tokens = min(max_num_batched_tokens, DEFAULT_MAX_GRAPH_TOKENS) \
            if max_graph_tokens is None else max_graph_tokens
        self._ep = False  # an EP dispatcher is installed (known once the graphs are checked)
        self._next_batch: ScheduledBatch | None = None  # scheduled by schedule_step()
        # async scheduling (vLLM's name): a step on the graphs is followed, before the host reads
        # its tokens, by the next one, fed with those tokens on the device (see _run_ahead)
        self.async_scheduling = bool(async_scheduling)
        self._ahead: _Launched | None = None
        self.steps_ahead = 0  # steps launched ahead so far
        # deferred detokenization (defer_detokenization): outputs whose text render_text fills
        self._defer_text = False
        self._pending_text: list[tuple[IncrementalDetokenizer, RequestOutput]] = []

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = [int(t) for t in prompt_token_ids]
        check_prompt_ids(ids, self.max_model_len, self.config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; the model folder has no tokenizer.json")
        gen = None  # None: the engine's shared generator
        if params.seed is not None:  # manual_seed takes [0, 2^64): fold negative seeds into it
            gen = torch.Generator(device=self.device).manual_seed(params.seed % 2**64)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        seq = Sequence(request_id, ids, params, generator=gen, detokenizer=detok)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._seqs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished() > 0

    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished()

    def set_async_scheduling(self, on: bool) -> None:
        """Turn async scheduling on or off (a step already launched ahead is still read by
        the next ``step()``)."""
        self.async_scheduling = bool(on)

    # -- detokenization -------------------------------------------------------------------------
    def defer_detokenization(self, defer: bool = True) -> None:
        """With ``defer``, ``step()`` returns outputs of requests without stop strings with their
        text not yet filled in, and ``render_text()`` fills it in later: the DP rank calls it
        while the next forward runs on the device, so detokenizing (at 256 requests 0.6-2.2 ms
        a step on a 2-core EPYC, bench/results/detokenize.json) is not host time between two GPU
        steps. Requests with stop strings still detokenize in the step: their text decides
        when they end."""
        self.render_text()
        self._defer_text = bool(defer)

    def render_text(self) -> None:
        """Fill in the text of every output whose detokenization was deferred, in step order."""
        pending, self._pending_text = self._pending_text, []
        for detok, out in pending:
            out.text = detok.finish(out.token_ids) if out.finished else detok.update(out.token_ids)

    # -- steps ----------------------------------------------------------------------------------
    def schedule_step(self) -> tuple[int, bool]:
        """Schedule the next ``step()``'s batch now and say what it is: (decode rows, has a
        prefill chunk). The DP rank loop sends this in its per-step all-reduce, so every rank
        knows the largest decode batch before the forward."""
        if self._ahead is not None:  # already launched
            return sum(s.slot >= 0 for s in self._ahead.seqs), self._ahead.prefill
        b = self._next_batch = self._take_batch()
        return len(b.decodes), bool(b.prefills)

    def graph_batch_size(self, num_decodes: int) -> int | None:
        """The padded size a decode-only step of ``num_decodes`` rows runs at on the graph path
        (a capture size), or None: no graph path here or too many rows. DP ranks call it with
        the largest decode count over ranks and all get the same answer (same sizes)."""
        graphs = self._decode_graphs()
        return None if graphs is None else graphs.size_for(num_decodes)

    def set_graph_max_batch(self, max_batch: int) -> None:
        """The largest graph size (default: this engine's KV slots). DP ranks set the maximum
        over ranks, so every rank captures the same sizes; a padding row never needs a slot.
        Call before the graphs are built (``warm_up``)."""
        if self._graphs_checked:
            raise RuntimeError("set_graph_max_batch after the decode graphs were built")
        self._graph_max_batch = int(max_batch)

    @torch.inference_mode()
    def dummy_step(self, pad_to: int | None = None) -> None:
        """A forward of zero real tokens: every MoE layer runs once (its collectives line up), no
        load. ``pad_to``: the decode size the DP ranks agreed on; the rank runs that graph with
        only padding rows (which write only the KV cache's scratch slot)."""
        if pad_to is not None:
            self._decode_graphs().run([], [], [], bs=pad_to)
            return
        meta = AttentionMetadata.build([], [], device=self.device)
        ids = torch.empty(0, dtype=torch.long, device=self.device)
        self.model(ids, meta, self.kv.layers, num_real_tokens=0)

    @torch.inference_mode()
    def step(self, pad_to: int | None = None, on_launched: Callable[[], None] | None = None
             ) -> list[RequestOutput]:
        """One forward of the scheduled batch. ``pad_to``: the padded decode size the DP ranks
        agreed on (a decode-only batch then runs the graph of that size). With an EP dispatcher
        installed a decode-only step uses the graphs only with ``pad_to``: alone, ranks could
        pick different sizes. ``on_launched``: called once, when the forward is queued on the
        device and before the host waits for it (a rank sends the previous step's outputs
        there, so that host work overlaps the GPU's).

        Async scheduling: a step on the graphs (decode-only, or decodes with short prefill
        chunks) may schedule and launch the next one before it returns (``_run_ahead``); the
        next call then only reads that step's tokens."""
        launched = on_launched or _nothing
        if self._ahead is not None:
            cur, self._ahead = self._ahead, None
            self._ahead = self._run_ahead(cur)
            launched()
            return self._finish(cur)
        batch = self._take_batch()
        if batch.num_tokens == 0:
            self.dummy_step(pad_to)
            launched()
            return []
        ids: list[int] = [s.token_at(s.num_tokens - 1) for s in batch.decodes]
        graphs = self._decode_graphs()
        if pad_to is not None and (graphs is None or batch.prefills):
            raise RuntimeError(f"step(pad_to={pad_to}) needs a decode-only batch on the graph path")
        if graphs is not None and self._ep and pad_to is None:
            graphs = None
        if pad_to is None and self.async_scheduling and not self._ep and self._launchable(graphs, batch):
            cur = self._launch(graphs, batch, None)
            self._ahead = self._run_ahead(cur)
            launched()
            return self._finish(cur)
        if graphs is not None and not batch.prefills and graphs.fits(len(ids)):
            seqs = list(batch.decodes)
            logits = graphs.run(ids, [s.slot for s in seqs], [s.num_tokens - 1 for s in seqs], bs=pad_to)
            launched()
            self._advance(batch)
            return self._sample(seqs, logits)
        sample_rows: list[int] = list(range(len(batch.decodes)))
        sampled: list[Sequence] = list(batch.decodes)
        prefills: list[tuple[int, int, int]] = []
        scored: list[tuple[Sequence, int, int, int]] = []  # prompt logprobs: seq, row, start, n
        off = len(ids)
        for s, n in batch.prefills:
            start = s.num_computed
            if s.params.prompt_logprobs is not None:
                scored.append((s, off, start, n))
            ids.extend(s.tokens(start, start + n))
            prefills.append((s.slot, start, n))
            off += n
            if start + n == s.num_tokens:
                sample_rows.append(off - 1)
                sampled.append(s)
        decode_rows = [(s.slot, s.num_tokens - 1) for s in batch.decodes]
        if graphs is not None and not scored and _graph_rows_fit(graphs, len(ids), prefills):
            slots = [slot for slot, _ in decode_rows]
            positions = [p for _, p in decode_rows]
            for slot, start, n in prefills:
                slots.extend([slot] * n)
                positions.extend(range(start, start + n))
            logits = graphs.run(ids, slots, positions, sample_rows=sample_rows)
            launched()
            self._advance(batch)
            return self._sample(sampled, logits) if sampled else []
        meta = AttentionMetadata.build(decode_rows, prefills, device=self.device)
        input_ids = long_tensor(ids, self.device)
        hidden = self.model(input_ids, meta, self.kv.layers)
        launched()
        for s, row, start, n in scored:
            self._score_prompt(s, hidden, row, start, n)
        self._advance(batch)
        if not sampled:
            return []
        if len(sample_rows) == hidden.shape[0]:  # every row samples (decode-only step)
            logits = self.model.compute_logits(hidden)
        else:
            rows = torch.tensor(sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        return self._sample(sampled, logits)

    def _take_batch(self) -> ScheduledBatch:
        """The batch ``schedule_step`` (or a step that could not be launched ahead) scheduled,
        less the sequences that ended since (their slot freed), or a new one."""
        batch, self._next_batch = self._next_batch, None
        if batch is None:
            return self.scheduler.schedule()
        return ScheduledBatch([s for s in batch.decodes if s.slot >= 0],
                              [(s, n) for s, n in batch.prefills if s.slot >= 0])

    def _launchable(self, graphs, batch: ScheduledBatch) -> bool:
        """``batch`` can run from the graphs with its sampling left on the device: it fits them
        (a mixed step: ``_graph_rows_fit``), some row samples, and no row asks for
        log-probabilities (of its tokens or of its prompt)."""
        if graphs is None or batch.num_tokens == 0:
            return False
        if any(s.params.logprobs is not None for s in batch.decodes):
            return False
        samples = bool(batch.decodes)
        chunks = []
        for s, n in batch.prefills:
            if s.params.prompt_logprobs is not None or s.params.logprobs is not None:
                return False
            samples = samples or s.num_computed + n == s.num_tokens
            chunks.append((s.slot, s.num_computed, n))
        return samples and _graph_rows_fit(graphs, batch.num_tokens, chunks)

    def _launch(self, graphs, batch: ScheduledBatch, first_ids: torch.Tensor | None) -> _Launched:
        """Queue ``batch`` on the graphs and its sampling, and start copying the sampled tokens
        to the host; nothing waits. ``first_ids``: the input ids of the first ``len(first_ids)``
        decode rows on the device, tokens of a step still in flight that the host has not
        appended (each such row sits at position ``num_computed``, one past its last appended
        token); the other decode rows' last token is appended (a prompt's last token counts as a
        decode row too). Rows that sample: the decodes, then each prefill chunk that ends its
        prompt."""
        decodes = batch.decodes
        n_pending = 0 if first_ids is None else len(first_ids)
        ids = [0 if i < n_pending else s.token_at(s.num_tokens - 1) for i, s in enumerate(decodes)]
        slots = [s.slot for s in decodes]
        positions = [s.num_computed for s in decodes]
        sampled = list(decodes)
        # a decode row without a pending token whose output is empty computes its prompt's last
        # token: its first sample, which gets the prompt (penalties)
        rows = [SampleRow(s.params, s.generator, s.slot,
                          s.prompt_ids if i >= n_pending and not s.output_ids else None,
                          len(s.output_ids) + (i < n_pending)) for i, s in enumerate(decodes)]
        sample_rows = list(range(len(decodes)))
        for s, n in batch.prefills:
            start = s.num_computed
            ids.extend(s.tokens(start, start + n))
            slots.extend([s.slot] * n)
            positions.extend(range(start, start + n))
            if start + n == s.num_tokens:  # its first token
                sample_rows.append(len(ids) - 1)
                sampled.append(s)
                rows.append(SampleRow(s.params, s.generator, s.slot, s.prompt_ids, len(s.output_ids)))
        logits = graphs.run(ids, slots, positions, sample_rows=sample_rows if batch.prefills else None,
                            first_ids=first_ids)
        tokens = self.sampler.sample_tokens(logits, rows)
        for s in decodes:
            s.num_computed += 1
        for s, n in batch.prefills:
            s.num_computed += n
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return _Launched(sampled, tokens, host, ready, bool(batch.prefills))
        return _Launched(sampled, tokens, tokens, None, bool(batch.prefills))

    def _run_ahead(self, cur: _Launched) -> _Launched | None:
        """Schedule the step after ``cur`` now and launch it, its decode rows fed with cur's
        tokens on the device, when async scheduling is on (without EP) and that step can run
        from the graphs (``_launchable``). The scheduler counts cur's rows as holding their
        sampled token, less those that ended before (EOS, stop, abort: slot freed) and those
        that end at cur by length; it may admit waiting requests and continue prompts as usual.
        A row that ends at cur by a token (EOS, a stop) still runs once more; its extra token is
        dropped, and counts as expert load. A step that cannot be launched stays scheduled for
        the next call (``_take_batch``)."""
        if not self.async_scheduling or self._ep or self._graphs is None:
            return None
        pending = frozenset(s.request_id for s in cur.seqs if s.slot >= 0 and not self._ends_by_length(s, 1))
        batch = self.scheduler.schedule(pending)
        if not self._launchable(self._graphs, batch):
            self._next_batch = batch if batch.num_tokens else None  # empty: schedule afresh next call
            return None
        row = {s.request_id: i for i, s in enumerate(cur.seqs)}
        # the rows fed by cur's tokens first; the others (a prompt with one token left, which
        # the scheduler also counts as a decode) read theirs from the host
        fed = [s for s in batch.decodes if s.request_id in pending]
        batch = ScheduledBatch(fed + [s for s in batch.decodes if s.request_id not in pending], batch.prefills)
        keep = [row[s.request_id] for s in fed]
        if not keep:
            ids = None
        elif keep == list(range(len(cur.seqs))):
            ids = cur.tokens
        elif cur.tokens.is_cuda:
            ids = cur.tokens.index_select(0, long_tensor(keep, "cpu").pin_memory().to(cur.tokens.device,
                                                                                      non_blocking=True))
        else:
            ids = cur.tokens.index_select(0, long_tensor(keep))
        self.steps_ahead += 1
        return self._launch(self._graphs, batch, ids)

    def _ends_by_length(self, s: Sequence, pending: int) -> bool:
        """``s`` ends by max_tokens or max_model_len once its ``pending`` sampled tokens are in."""
        return (len(s.output_ids) + pending >= s.params.max_tokens
                or s.num_tokens + pending >= self.max_model_len)

    def _finish(self, cur: _Launched) -> list[RequestOutput]:
        """Wait for cur's tokens and emit the outputs of its rows still running."""
        if cur.ready is not None:
            cur.ready.synchronize()
        tokens = cur.host.tolist()
        live = [i for i, s in enumerate(cur.seqs) if s.slot >= 0]  # the others ended meanwhile
        outs = self._emit([cur.seqs[i] for i in live], [tokens[i] for i in live], [None] * len(live))
        if self._ahead is not None and not any(s.slot >= 0 for s in self._ahead.seqs):
            self._ahead = None  # every row of the step run ahead ended: nothing to read there
        return outs

    @staticmethod
    def _advance(batch: ScheduledBatch) -> None:
        for s in batch.decodes:
            s.num_computed += 1
        for s, n in batch.prefills:
            s.num_computed += n

    def _score_prompt(self, s: Sequence, hidden: torch.Tensor, row: int, start: int, n: int) -> None:
        """Log-probabilities of the prompt tokens this chunk predicts (position p predicts p + 1;
        the chunk's last row of the prompt predicts the first generated token: not scored here)."""
        if start == 0:
            s.prompt_logprobs = [None]
        end = min(start + n, len(s.prompt_ids) - 1)
        if end > start:
            logits = self.model.compute_logits(hidden[row : row + end - start])
            s.prompt_logprobs.extend(token_logprobs(
                logits, s.prompt_ids[start + 1 : end + 1], s.params.prompt_logprobs,
                self.sampler.valid_vocab))

    def _sample(self, sampled: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        rows = [SampleRow(s.params, s.generator, s.slot,
                          s.prompt_ids if not s.output_ids else None, len(s.output_ids))
                for s in sampled]
        tokens, lps = self.sampler(logits, rows)
        return self._emit(sampled, tokens, lps)

    def _emit(self, sampled: list[Sequence], tokens: list[int], lps: list) -> list[RequestOutput]:
        """Append each sequence's new token, decide whether it ends, and build its output."""
        outs = []
        for s, tok, lp in zip(sampled, tokens, lps):
            if lp is not None:
                s.logprobs.append(lp)
            deferred = self._append(s, tok)
            out = RequestOutput(
                s.request_id, s.prompt_ids, list(s.output_ids), s.text, s.finished, s.finish_reason,
                list(s.logprobs) if s.params.logprobs is not None else None,
                s.prompt_logprobs,
            )
            if deferred:
                self._pending_text.append((s.detokenizer, out))
            outs.append(out)
        return outs

    def warm_up(self) -> bool:
        """Startup work before serving: capture the decode CUDA graphs now instead of at the first
        decode-only step, and compile the kernel variants of eager steps (``warm_prefill``,
        ``warm_eager_decode``). Does these only where decode graphs are captured (CUDA, not
        ``enforce_eager``); call it after the runtime installed its dispatchers. With an EP
        dispatcher the capture and the warm-up forwards run the EP collectives, so every rank
        must call it at the same point (the DP rank does, at startup); the warm-up sizes are
        functions of settings all ranks share (the step budget, max_model_len and the graph
        batch size the ranks agreed on), so every rank runs the same forwards in the same
        order. True when graphs are captured."""
        graphs = self._decode_graphs()
        if graphs is None or not graphs.capture_enabled:
            return False
        self.warm_eager_kernels()
        return True

    def warm_eager_kernels(self) -> None:
        """The warm-up forwards of eager steps (``warm_prefill``, then ``warm_eager_decode``):
        ``warm_up`` runs them where graphs are captured; offline drivers may run them anywhere."""
        self.warm_prefill()
        self.warm_eager_decode()

    @torch.inference_mode()
    def warm_eager_decode(self) -> list[int]:
        """One eager forward of b decode rows (all in the KV cache's scratch slot, no expert load;
        b up to the graph batch size) per split plan of the decode-attention kernel
        (``split_plan``: its launch variant depends on the row count), so the variants that eager
        steps with decode rows use (steps that mix decodes with prefill chunks too large for the
        graphs) compile now, not inside serving steps. Returns the row counts run."""
        from eplb.kernels.decode_attention import split_plan

        cfg = self.config
        plans: dict[int, int] = {}
        # up to the graph batch size (DP ranks agree on it; the rows share the scratch slot), so
        # every EP rank runs the same forwards
        for b in range(1, self._graph_max_batch + 1):
            plans.setdefault(split_plan(b, cfg.num_kv_heads, self.kv.max_len), b)
        sizes = sorted(plans.values())
        for b in sizes:
            meta = AttentionMetadata.build([(self.kv.scratch_slot, 0)] * b, [], device=self.device)
            ids = torch.zeros(b, dtype=torch.long, device=self.device)
            self.model(ids, meta, self.kv.layers, num_real_tokens=0)
        return sizes

    @torch.inference_mode()
    def warm_prefill(self) -> list[int]:
        """One eager forward of padding tokens per step size whose kernel variants may differ, so
        Triton compiles them (and cuDNN plans its prefill buckets) before serving instead of inside
        the steps that first need them (a compile stalls a step for seconds). Sizes: every power
        of two up to the step budget (``max_num_batched_tokens``) and the budget itself (the MoE
        tile table, its sort's padded sizes and the FP8 linear tiles change at powers of two), and
        each cuDNN prefill bucket a single chunk can fill. A size larger than one slot's keys runs
        as several chunks, all in the KV cache's scratch slot, as a step of several prompts would.
        The tokens count as no expert load. Returns the sizes run (tokens per forward)."""
        from eplb.model.attention import CUDNN_PREFILL_BUCKET, CUDNN_PREFILL_MIN

        budget = self.scheduler.max_num_batched_tokens
        max_len = self.kv.max_len
        sizes = {1 << j for j in range(budget.bit_length())} | {budget}
        longest = min(max_len, budget)  # one chunk's most tokens
        sizes |= set(range(CUDNN_PREFILL_MIN, longest + 1, CUDNN_PREFILL_BUCKET))
        if longest >= CUDNN_PREFILL_MIN:
            sizes.add(longest)  # its bucket may be max_len itself
        for n in sorted(sizes):
            chunks = [(self.kv.scratch_slot, 0, min(max_len, n - i)) for i in range(0, n, max_len)]
            meta = AttentionMetadata.build([], chunks, device=self.device)
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            self.model(ids, meta, self.kv.layers, num_real_tokens=0)
        return sorted(sizes)

    def _decode_graphs(self):
        """The decode graph runner (captured, or its padded static forward run eagerly), or
        None: no graph path (see :meth:`_graph_mode`)."""
        if not self._graphs_checked:
            self._graphs_checked = True
            use, capture = self._graph_mode()
            if use:
                from eplb.engine.cuda_graphs import DecodeGraphs

                # with EP, decode sizes only: ranks pad decode steps to a size they agree on,
                # and every step with a prefill chunk runs eager on every rank
                self._graphs = DecodeGraphs(
                    self.model, self.kv.layers, max_batch=self._graph_max_batch,
                    scratch_slot=self.kv.scratch_slot, device=self.device, capture=capture,
                    max_tokens=None if self._ep else self._graph_max_tokens,
                )
                self._graphs.capture()
        return self._graphs

    def _graph_mode(self) -> tuple[bool, bool]:
        """(use the padded static decode path, capture it in CUDA graphs).

        Captured: CUDA and not ``enforce_eager``; with an EP dispatcher also only if it has a
        static path (``begin_static_step``: allgather_reducescatter) and the experts run in the
        Triton kernels (the torch expert path syncs with the host). Used uncaptured: with
        ``static_decode``, wherever the EP dispatcher (if any) has a static path."""
        from eplb.model.moe import local_dispatch

        layers = self.model.moe_layers()
        dispatchers = [l.dispatcher for l in layers if l.dispatcher is not local_dispatch]
        self._ep = bool(dispatchers)
        if not all(hasattr(d, "begin_static_step") for d in dispatchers):
            return False, False  # naive / alltoall: data-dependent shapes, eager only
        capture = not self.enforce_eager and self.device.type == "cuda"
        if capture and self._ep:
            probe = torch.empty(0, dtype=self.dtype, device=self.device)
            capture = all(l.use_fused(probe) for l in layers)
        return capture or self.static_decode, capture

    def _append(self, s: Sequence, tok: int) -> bool:
        """Add a sampled token and decide whether the request ends; True when its text is left
        to ``render_text`` (deferred detokenization, no stop strings)."""
        s.output_ids.append(tok)
        p = s.params
        reason = None
        if (not p.ignore_eos and tok in self.eos_token_ids) or (p.stop_token_ids and tok in p.stop_token_ids):
            reason = "stop"
        if reason is None and self._ends_by_length(s, 0):
            reason = "length"
        deferred = s.detokenizer is not None and self._defer_text and not p.stop
        if s.detokenizer is not None and not deferred:
            # a window per step; the whole output decoded once, when it ends
            detok = s.detokenizer
            s.text = detok.update(s.output_ids) if reason is None else detok.finish(s.output_ids)
            # as vLLM: no stop string ends a request before min_tokens
            if p.stop and reason != "stop" and len(s.output_ids) >= p.min_tokens:
                hits = [i for i in (s.text.find(x) for x in p.stop) if i >= 0]
                if hits:
                    s.text = s.text[: min(hits)]
                    reason = "stop"
        if reason is not None:
            s.finished = True
            s.finish_reason = reason
            self.scheduler.finish(s)
            self._seqs.pop(s.request_id, None)
        return deferred


def _graph_rows_fit(graphs, num_tokens: int, prefills: list[tuple[int, int, int]]) -> bool:
    """A step with prefill chunks (slot, start, n) runs from the graphs: it fits a graph size
    and its chunks' keys re-read per token stay within MAX_GRAPH_PREFILL_KEY_READS."""
    reads = sum(n * (start + n) for _, start, n in prefills)
    return graphs.fits(num_tokens) and reads <= MAX_GRAPH_PREFILL_KEY_READS
