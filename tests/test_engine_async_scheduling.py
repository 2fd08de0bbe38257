"""Async scheduling: a step on the graph path (decode-only or mixed with prefill chunks) schedules
and launches the next one before the host reads its tokens. Outputs must be exactly those of one
step at a time, whatever ends a request (length, a stop token in flight, an abort) and whenever
requests arrive."""

from __future__ import annotations

import torch

from eplb.engine import SamplingParams
from model_helpers import static_path_core, tiny_checkpoint_fixture

torch.set_num_threads(1)


path = tiny_checkpoint_fixture(seed=11)


def make_core(path, async_scheduling: bool, max_model_len: int = 64, **engine):
    """The graph runner's static forward run eagerly (the CPU twin of the CUDA-graph path)."""
    return static_path_core(path, max_tokens=64, max_model_len=max_model_len, async_scheduling=async_scheduling,
                            **engine)


def count_ahead(core, prefill_rows: list | None = None) -> list[int]:
    """Wrap _launch: one entry per step launched ahead (its decode row count); with
    ``prefill_rows`` also the prefill tokens of each. Checks that no row of such a step belongs
    to a request that its pending token ends by length (max_tokens or max_model_len): that row
    would be wasted work."""
    ahead = []
    inner = core._launch

    def wrapped(graphs, batch, first_ids):
        if first_ids is not None:
            ahead.append(len(batch.decodes))
            if prefill_rows is not None:
                prefill_rows.append(sum(n for _, n in batch.prefills))
            assert len(first_ids) <= len(batch.decodes)
            for s in batch.decodes[: len(first_ids)]:  # the rows fed by the step in flight
                assert len(s.output_ids) + 1 < s.params.max_tokens and s.num_tokens + 1 < core.max_model_len
        return inner(graphs, batch, first_ids)

    core._launch = wrapped
    return ahead


def drive(core, requests, *, late=(), abort_at=None):
    """requests: (id, prompt, params) added at the start; late: (call index, id, prompt, params);
    abort_at: (call index, id). -> ({id: (token ids, finish reason)}, outputs per id, steps)."""
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
    done, seen, calls = {}, {}, 0
    while core.has_unfinished_requests() or any(c >= calls for c, *_ in late):
        for c, rid, prompt, params in late:
            if c == calls:
                core.add_request(rid, prompt, params)
        if abort_at is not None and abort_at[0] == calls:
            core.abort_request(abort_at[1])
        for o in core.step():
            seen.setdefault(o.request_id, []).append(list(o.token_ids))
            if o.finished:
                done[o.request_id] = (o.token_ids, o.finish_reason)
        calls += 1
    return done, seen, calls


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


REQUESTS = [(f"r{i}", list(range(3 + i, 10 + 2 * i)), greedy(5 + 3 * i)) for i in range(5)]


def test_same_outputs_and_steps_ahead_ran(path):
    ref = drive(make_core(path, False), REQUESTS)
    core = make_core(path, True)
    ahead = count_ahead(core)
    got = drive(core, REQUESTS)
    assert got[0] == ref[0] and len(ref[0]) == 5
    assert got[1] == ref[1]  # every intermediate output too, in order
    assert got[2] == ref[2]  # one forward per call either way
    assert len(ahead) > 5 and min(ahead) >= 1


def test_a_stop_token_in_flight_drops_the_extra_token(path):
    """r1 ends by a stop token at a step whose successor was already launched: its output ends
    there, as one step at a time, and the others are unchanged."""
    ref = drive(make_core(path, False), REQUESTS)[0]
    tok = ref["r1"][0][3]  # the 4th token r1 generates
    first = ref["r1"][0].index(tok)
    reqs = [(rid, p, greedy(prm.max_tokens, stop_token_ids=[tok]) if rid == "r1" else prm)
            for rid, p, prm in REQUESTS]
    ref2 = drive(make_core(path, False), reqs)
    core = make_core(path, True)
    ahead = count_ahead(core)
    got = drive(core, reqs)
    assert got[0] == ref2[0] and got[1] == ref2[1]
    assert got[0]["r1"] == (ref["r1"][0][: first + 1], "stop")
    assert ahead


def test_eos_seeded_sampling_and_late_requests(path):
    """Seeded random sampling gives the same tokens; a request that arrives while a step runs
    ahead waits for the scheduler and then gets the same tokens as one step at a time."""
    reqs = [("s0", [5, 6, 7, 8], SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)),
            ("s1", [9, 10, 11], SamplingParams(max_tokens=9, temperature=0.7, top_k=5, seed=4, ignore_eos=True)),
            ("g", [4, 4, 4], greedy(10))]
    late = [(4, "late", [12, 13, 14, 15], greedy(6)), (7, "late2", [3, 5], greedy(4))]
    ref = drive(make_core(path, False), reqs, late=late)
    got = drive(make_core(path, True), reqs, late=late)
    assert got[0] == ref[0] and len(ref[0]) == 5
    assert got[1] == ref[1]


def test_abort_while_a_step_runs_ahead(path):
    for at in (3, 4, 6):
        ref = drive(make_core(path, False), REQUESTS, abort_at=(at, "r4"))
        got = drive(make_core(path, True), REQUESTS, abort_at=(at, "r4"))
        assert got[0] == ref[0] and "r4" not in got[0]
        assert got[1] == ref[1]


def test_max_model_len_ends_are_not_run_past(path):
    """Requests that end by max_model_len: the step after their last never runs their row."""
    reqs = [("a", list(range(3, 20)), greedy(100)), ("b", list(range(3, 12)), greedy(100))]
    ref = drive(make_core(path, False, max_model_len=24), reqs)
    core = make_core(path, True, max_model_len=24)
    ahead = count_ahead(core)
    got = drive(core, reqs)
    assert ahead
    assert got[0] == ref[0]
    assert {r: reason for r, (_, reason) in got[0].items()} == {"a": "length", "b": "length"}
    assert len(got[0]["a"][0]) == 24 - 17 and len(got[0]["b"][0]) == 24 - 9


def test_off_runs_no_step_ahead(path):
    core = make_core(path, False)
    ahead = count_ahead(core)
    drive(core, REQUESTS)
    assert ahead == []


def test_rank_loop_with_async_scheduling_gives_one_process_tokens(path):
    """A DP rank without EP (world size 1, over gloo) runs its decode steps ahead on the static
    path: the merged greedy tokens equal one plain process's, and steps did run ahead."""
    from dist_helpers import merged_tokens
    from eplb.engine import LLM
    from eplb.runtime.dp_offline import Scenario, run_scenarios

    engine = {"dtype": "float32", "max_model_len": 64, "max_num_seqs": 6, "max_num_batched_tokens": 16}
    reqs = [(p, prm) for _, p, prm in REQUESTS] + [(list(range(5, 40)), greedy(7))]  # 3 chunks
    ref = LLM(path, **engine).generate([p for p, _ in reqs], [s for _, s in reqs])
    sc = Scenario("dp1-static", engine={"static_decode": True}, requests=reqs, assign=[0] * len(reqs))
    (res,) = run_scenarios(path, 1, [sc], engine, timeout_s=120)
    assert merged_tokens(res) == {i: o.token_ids for i, o in enumerate(ref)}
    assert res[0]["stats"]["steps_ahead"] > 5


def test_a_request_that_arrives_waits_one_step_more_at_most(path):
    """Added while a step runs ahead, a request gets its first token one call later than one
    step at a time would give it, never more."""
    first = {}
    for on in (False, True):
        core = make_core(path, on)
        for rid, prompt, params in REQUESTS[:3]:
            core.add_request(rid, prompt, params)
        for _ in range(4):
            core.step()
        assert (core._ahead is not None) == on  # a step runs ahead now
        core.add_request("new", [7, 8, 9], greedy(3))
        calls = 0
        while True:
            calls += 1
            if any(o.request_id == "new" for o in core.step()):
                break
        first[on] = calls
    assert first[False] == 1 and first[True] == 2


def test_mixed_steps_run_ahead_with_the_same_outputs(path):
    """Steps that carry prefill chunks (late requests, a prompt split over several steps by the
    token budget) also run ahead: a waiting request is admitted while the step before it is in
    flight. Every output equals one step at a time, and steps launched ahead carried prompts."""
    reqs = REQUESTS + [("long", list(range(5, 45)), greedy(6))]
    late = [(3, "late", list(range(20, 36)), greedy(5)), (5, "late2", [3, 5], greedy(4)),
            (6, "late3", list(range(7, 30)), greedy(8))]
    engine = {"max_num_batched_tokens": 24}
    ref = drive(make_core(path, False, **engine), reqs, late=late)
    core = make_core(path, True, **engine)
    prefill_rows: list[int] = []
    ahead = count_ahead(core, prefill_rows)
    got = drive(core, reqs, late=late)
    assert got[0] == ref[0] and len(ref[0]) == 9
    assert got[1] == ref[1]
    assert sum(1 for n in prefill_rows if n) >= 3  # mixed steps launched ahead
    assert len(ahead) > 10


def test_a_mixed_step_that_cannot_run_ahead_stays_scheduled(path):
    """A prompt-logprobs request cannot run from a step launched ahead: the step scheduled for
    it is kept and run by the next call (eager), and nothing is lost or repeated."""
    lp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=1)
    late = [(3, "scored", [6, 7, 8, 9, 10], lp)]
    ref = drive(make_core(path, False), REQUESTS, late=late)
    core = make_core(path, True)
    got = drive(core, REQUESTS, late=late)
    assert got[0] == ref[0] and got[1] == ref[1]
    assert core.steps_ahead > 5


def closed_loop(core, clients: int, total: int, prompt_len: int, out_len: int) -> tuple[dict[str, int], int]:
    """``clients`` requests in flight, a new one added as one finishes (as `eplb bench serve
    --max-concurrency` does) -> (calls from each request's arrival to its first token, calls)."""
    sent, done, calls = 0, 0, 0
    arrived: dict[str, int] = {}
    first: dict[str, int] = {}

    def send():
        nonlocal sent
        rid = f"q{sent}"
        core.add_request(rid, [(7 * sent + i) % 40 + 2 for i in range(prompt_len)], greedy(out_len))
        arrived[rid] = calls
        sent += 1

    for _ in range(clients):
        send()
    while done < total:
        outs = core.step()
        calls += 1
        for o in outs:
            first.setdefault(o.request_id, calls - arrived[o.request_id])
            if o.finished:
                done += 1
                if sent < total:
                    send()
    return first, calls


def test_closed_loop_no_request_waits_for_its_first_token(path):
    """Served-like load (clients keep the engine full, prompts split by the token budget, one
    of them down to a last token that the scheduler runs as a decode row): with async scheduling
    a request's first token comes one call later on average (the step that carries its prompt
    is launched a call ahead), at most two (the budget then splits prompts differently), and
    the run takes at most one call more per generation of clients (each request's successor
    arrives that much later); steps with prompts ran ahead."""
    engine = {"max_num_batched_tokens": 24}
    off, calls_off = closed_loop(make_core(path, False, **engine), 6, 20, 30, 9)
    core = make_core(path, True, **engine)
    prefill_rows: list[int] = []
    count_ahead(core, prefill_rows)
    on, calls_on = closed_loop(core, 6, 20, 30, 9)
    assert on.keys() == off.keys() and len(on) == 20
    assert all(on[r] <= off[r] + 2 for r in on), {r: (off[r], on[r]) for r in on}
    assert sum(on.values()) - sum(off.values()) <= len(on)
    assert calls_on <= calls_off + -(-20 // 6)
    assert any(prefill_rows)


def test_a_prompts_last_token_as_a_decode_row_gets_its_penalties(path):
    """A prompt chunked down to its last token runs that token as a decode row, which samples
    the request's first token: the sampler must get the prompt there (its penalty state starts
    from it), whether the step is launched fresh or ahead; tokens equal one step at a time."""
    reqs = [(f"p{i}", [(5 * i + j) % 30 + 2 for j in range(9 + i)],
             SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=2.0))
            for i in range(4)]
    engine = {"max_num_batched_tokens": 8}  # 9-12 token prompts: chunks of 8 leave 1-4 tokens
    ref = drive(make_core(path, False, **engine), reqs)
    core = make_core(path, True, **engine)
    prompts = {tuple(p) for _, p, _ in reqs}
    first_samples = []
    inner = core.sampler.sample_tokens

    def spy(logits, rows):
        first_samples.extend(r.prompt_ids for r in rows if r.num_generated == 0)
        return inner(logits, rows)

    core.sampler.sample_tokens = spy
    got = drive(core, reqs)
    assert got[0] == ref[0] and got[1] == ref[1]
    assert len(first_samples) == 4 and all(p is not None and tuple(p) in prompts for p in first_samples)
