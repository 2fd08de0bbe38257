"""DP + EP ranks with live EPLB never change an answer (multi-process, gloo on CPU).

Every configuration of one world size runs in ONE group of spawned ranks (``run_scenarios``),
so process start-up is paid once per world size. Each scenario starts from a fresh engine with
the default placement, gives every rank its share of the requests, and runs the real rank loop.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from dist_helpers import merged_tokens
from eplb.engine import LLM, SamplingParams
from eplb.model.tiny import make_tiny_checkpoint
from eplb.runtime.dp_offline import Scenario, run_scenarios

torch.set_num_threads(1)
ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8}


def _requests() -> list[tuple[list[int], SamplingParams]]:
    """Different prompt and output lengths, so ranks run out of work at different steps
    (dummy steps) and prefill chunks mix with decodes."""
    g = torch.Generator().manual_seed(7)
    reqs = []
    for i in range(8):
        prompt = torch.randint(3, 128, (3 + 5 * i,), generator=g).tolist()
        reqs.append((prompt, SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True)))
    return reqs


def _skewed_requests() -> list[tuple[list[int], SamplingParams]]:
    """Long prompts of ONE repeated token, prefilled in small chunks: every token of every step
    has the same hidden state (attention averages identical values), so the same two experts
    of each layer get all the load, step after step."""
    return [([9] * (56 + 8 * i), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            for i in range(8)]


SKEW_ENGINE = {"max_num_batched_tokens": 16}


def _eplb(use_async: bool, world: int, **extra) -> dict:
    cfg = {"window_size": 4, "step_interval": 3, "num_redundant_experts": world,
           "use_async": use_async, "debug_verify_commits": True, "transfer_timeout_s": 20.0}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe"))
    make_tiny_checkpoint(path, "qwen3_moe", seed=3)  # 2 layers, hidden 64, 8 experts, top-2
    return path


def _reference(path: str, reqs, engine: dict | None = None) -> dict[int, list[int]]:
    llm = LLM(path, **{**ENGINE, **(engine or {})})
    outs = llm.generate([p for p, _ in reqs], [s for _, s in reqs])
    return {i: o.token_ids for i, o in enumerate(outs)}


@pytest.fixture(scope="module")
def reference(model):
    return _reference(model, _requests()), _reference(model, _skewed_requests(), SKEW_ENGINE)


SCENARIOS_2 = [
    Scenario("agrs-off", "allgather_reducescatter", None),
    Scenario("naive-off", "naive", None),
    Scenario("agrs-sync", "allgather_reducescatter", _eplb(False, 2)),
    Scenario("naive-async", "naive", _eplb(True, 2, debug_transfer_delay_s=0.05)),
    # rank 1's transfer raises in the first rebalance (sync: peers wait out the timeout)
    Scenario("agrs-sync-fault", "allgather_reducescatter",
             _eplb(False, 2, debug_fail_rank=1, transfer_timeout_s=1.5)),
    # rank 0 (the one that computes placements) fails in the first async rebalance
    Scenario("naive-async-fault", "naive", _eplb(True, 2, debug_fail_rank=0, transfer_timeout_s=1.5)),
    # rank 1 never reports its layer staged: only the timeout ends the rebalance
    Scenario("agrs-async-stall", "allgather_reducescatter",
             _eplb(True, 2, debug_fail_rank=1, debug_fail_mode="stall", transfer_timeout_s=1.5)),
    # the controller with the balancer's other knobs: EWMA estimate, shift trigger, skip test
    Scenario("agrs-async-ewma-shift", "allgather_reducescatter",
             _eplb(True, 2, load_estimator="ewma", load_half_life=4, rebalance_trigger="shift",
                   shift_steps=2, shift_min_gap=2, skip_gain_threshold=0.001)),
    # the policy itself raises (rank 0 reports it in the packet) or never returns (timeout)
    Scenario("naive-async-policy-raise", "naive",
             _eplb(True, 2, debug_fail_rank=0, debug_fail_phase="policy", transfer_timeout_s=1.5)),
    Scenario("agrs-async-policy-stall", "allgather_reducescatter",
             _eplb(True, 2, debug_fail_rank=0, debug_fail_phase="policy", debug_fail_mode="stall",
                   transfer_timeout_s=1.5)),
    # the token all-to-all: each token sent once per rank holding one of its experts
    Scenario("a2a-sync", "alltoall", _eplb(False, 2)),
    Scenario("a2a-async", "alltoall", _eplb(True, 2, debug_transfer_delay_s=0.05)),
]
SCENARIOS_4 = [
    Scenario("naive-off", "naive", None),
    Scenario("agrs-async-slow", "allgather_reducescatter",
             _eplb(True, 4, debug_transfer_delay_s=0.15), check_verifier=True),
    Scenario("naive-sync", "naive", _eplb(False, 4)),
    Scenario("agrs-async-fault", "allgather_reducescatter",
             _eplb(True, 4, debug_fail_rank=2, transfer_timeout_s=1.5)),
    Scenario("skew-off", "allgather_reducescatter", None, engine=SKEW_ENGINE),
    Scenario("skew-async", "allgather_reducescatter",
             _eplb(True, 4, window_size=4, step_interval=4), engine=SKEW_ENGINE),
    Scenario("a2a-sync", "alltoall", _eplb(False, 4)),
    Scenario("a2a-async", "alltoall", _eplb(True, 4, debug_transfer_delay_s=0.05)),
]


def _with_requests(scenarios: list[Scenario]) -> list[Scenario]:
    for sc in scenarios:
        sc.requests = _skewed_requests() if sc.name.startswith("skew") else _requests()
    return scenarios


@pytest.fixture(scope="module")
def runs(model):
    """{world_size: {scenario name: per-rank results}}"""
    out = {}
    for world, scenarios in ((2, SCENARIOS_2), (4, SCENARIOS_4)):
        res = run_scenarios(model, world, _with_requests(scenarios), ENGINE, timeout_s=240)
        out[world] = {sc.name: r for sc, r in zip(scenarios, res)}
    return out


ALL = [(2, sc.name) for sc in SCENARIOS_2] + [(4, sc.name) for sc in SCENARIOS_4]


@pytest.mark.parametrize("world,name", ALL)
def test_greedy_tokens_equal_single_process(runs, reference, world, name):
    want = reference[1] if name.startswith("skew") else reference[0]
    got = merged_tokens(runs[world][name])
    assert got == want


@pytest.mark.parametrize("world,name", ALL)
def test_every_rank_ran_the_same_steps(runs, world, name):
    per_rank = runs[world][name]
    steps = {r["stats"]["steps"] for r in per_rank}
    assert len(steps) == 1
    # uneven work: some rank ran dummy steps while another still had requests
    assert sum(r["stats"]["dummy_steps"] for r in per_rank) > 0


@pytest.mark.parametrize("world,name", [a for a in ALL if "off" not in a[1]
                                        and "stall" not in a[1]])
def test_rebalances_commit_checkpoint_weights_and_equal_maps(runs, world, name):
    per_rank = runs[world][name]
    stats = [r["stats"] for r in per_rank]
    assert stats[0]["rebalances"] >= 2, "step_interval is small: several rebalances must run"
    assert stats[0]["copies_moved"] > 0 and stats[0]["bytes_moved"] > 0
    for s in stats:
        # every committed layer was checked slot by slot against the checkpoint, and after each
        # rebalance the maps of all ranks and of every layer were compared
        assert s["verify_checks"] >= s["layers_committed"] > 0
        assert s["verify_mismatches"] == 0
        for key in ("rebalances", "rebalances_failed", "copies_moved", "bytes_moved",
                    "layers_committed"):
            assert s[key] == stats[0][key], key


def test_verifier_detects_a_wrong_expert_row(runs):
    assert all(r["verifier_caught"] for r in runs[4]["agrs-async-slow"])


def test_async_rebalance_overlaps_forward_steps(runs):
    stats = runs[4]["agrs-async-slow"][0]["stats"]
    ok = [e for e in stats["events"] if e["ok"] and e["layers_committed"] > 0]
    assert ok, "no async rebalance moved anything"
    # transfers were slowed down on purpose: steps kept running between start and commit
    assert max(e["steps_in_flight"] for e in ok) > 0
    assert stats["rebalances_failed"] == 0


@pytest.mark.parametrize("world,name", [(2, "agrs-sync-fault"), (2, "naive-async-fault"),
                                        (2, "agrs-async-stall"), (4, "agrs-async-fault"),
                                        (2, "naive-async-policy-raise"),
                                        (2, "agrs-async-policy-stall")])
def test_failed_transfer_keeps_old_placement_everywhere(runs, world, name):
    stats = [r["stats"] for r in runs[world][name]]
    for s in stats:
        assert s["rebalances_failed"] == 1
        first = s["events"][0]
        assert first["ok"] is False and first["layers_committed"] == 0 and first["copies"] == 0
        if "policy-stall" in name:
            assert "phase policy" in first["why"], first["why"]
        assert s["verify_mismatches"] == 0
        if "stall" in name:  # the run's requests finish during the stall (tokens checked above)
            assert not s["rebalance_in_flight"]
            continue
        # serving went on, later rebalances (on a fresh transfer group) succeed
        assert s["rebalances"] >= 1 and any(e["ok"] for e in s["events"][1:])


def test_balancedness_rises_on_a_skewed_workload(runs):
    hist = runs[4]["skew-async"][0]["stats"]["balancedness_history"]
    assert len(hist) >= 3, hist
    # first interval: default placement; by the last one the rebalances have long committed
    # (how many steps a commit takes depends on thread timing, so the middle is not judged)
    assert hist[-1] > hist[0] + 0.05, hist
    assert statistics.mean(hist[1:]) > hist[0], hist


def test_a_failing_rank_reports_its_traceback(model):
    """A rank that raises sends its traceback before its hard exit: the parent names the rank and
    the error instead of only seeing a dead process."""
    bad = Scenario("bad engine option", engine={"no_such_option": 1})
    with pytest.raises(RuntimeError, match=r"rank \d failed:(.|\n)*no_such_option"):
        run_scenarios(model, 2, [bad], ENGINE, timeout_s=120)
