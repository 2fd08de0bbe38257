"""`eplb rebalance` / `eplb simulate`: outputs, and one-line exit-2 errors for bad arguments."""

import json
import subprocess
import sys

import numpy as np
import pytest

from eplb.cli import main
from eplb.sim.simulate import simulate, step_bound
from eplb.sim.traces import SyntheticSpec, save_trace, synthetic_trace

README_LOAD = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(list(argv)))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_rebalance_readme_example_and_previous(tmp_path, capsys):
    np.save(tmp_path / "load.npy", README_LOAD)
    code, out, _ = run(capsys, "rebalance", "--load", str(tmp_path / "load.npy"), "--num-ranks", "8",
                       "--num-redundant", "4", "--num-nodes", "2", "--num-groups", "4",
                       "--json", str(tmp_path / "ds.json"))
    assert code == 0 and "balancedness" in out
    ds = json.loads((tmp_path / "ds.json").read_text())
    assert ds["phy2log"][0] == [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    assert ds["moved_experts"] is None and ds["policy_ms"] > 0
    assert len(ds["balancedness"]) == 2 and len(ds["replica_count"][0]) == 12
    code, _, _ = run(capsys, "rebalance", "--load", str(tmp_path / "load.npy"), "--num-ranks", "8",
                     "--num-redundant", "4", "--policy", "refined", "--previous",
                     str(tmp_path / "ds.json"), "--json", str(tmp_path / "ours.json"))
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert code == 0 and isinstance(ours["moved_experts"], int) and ours["moved_experts"] > 0
    assert min(ours["balancedness"]) >= min(ds["balancedness"])


def test_simulate_synthetic(tmp_path, capsys):
    code, out, _ = run(capsys, "simulate", "--synthetic", "steps=120,layers=2,experts=16,tokens=2000",
                       "--num-ranks", "4", "--num-redundant", "4", "--policy", "deepseek,refined",
                       "--window-size", "30", "--step-interval", "30", "--json",
                       str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"))
    assert code == 0 and "refined" in out and "deepseek" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert [p["policy"] for p in data["policies"]] == ["deepseek", "refined"]
    for p in data["policies"]:
        assert p["rebalances"] == 3
        assert 0 < p["p5_balancedness"] <= p["mean_balancedness"] <= 1
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_simulate_with_eplb_config_keys(tmp_path, capsys):
    args = ["simulate", "--synthetic", "steps=240,layers=2,experts=16,tokens=4000,shift_at=130,drift=0",
            "--num-ranks", "4", "--num-redundant", "4", "--policy", "refined",
            "--window-size", "60", "--step-interval", "60"]
    code, _, _ = run(capsys, *args, "--json", str(tmp_path / "a.json"))
    code2, _, _ = run(capsys, *args, "--json", str(tmp_path / "b.json"), "--eplb-config",
                      '{"rebalance_trigger": "shift", "shift_steps": 3, "shift_min_gap": 8}')
    assert code == code2 == 0
    plain = json.loads((tmp_path / "a.json").read_text())["policies"][0]
    early = json.loads((tmp_path / "b.json").read_text())
    assert early["eplb_config"]["rebalance_trigger"] == "shift"
    # the shift at step 130 gets its own rebalance (and a follow-up) before step 180
    assert early["policies"][0]["rebalances"] == plain["rebalances"] + 2
    assert early["policies"][0]["mean_balancedness"] > plain["mean_balancedness"]


def test_simulate_engine_counts_and_bound():
    trace = synthetic_trace(SyntheticSpec(steps=50, layers=2, experts=8, tokens=500))
    r = simulate(trace, "refined", 4, 4, window_size=10, step_interval=10)
    assert r.rebalances == 4 and len(r.policy_ms) == 4
    assert r.balancedness.shape == (50, 2)
    assert (r.balancedness <= step_bound(trace, 4, 4) + 1e-9).all()
    cap = simulate(trace, "refined", 4, 4, window_size=10, step_interval=10, max_moves=1)
    assert cap.copies_moved <= 4 * 2 * 1


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["simulate", "--synthetic", "default", "--num-ranks", "5", "--num-redundant", "8"],
         "must divide"),
        (["simulate", "--synthetic", "default", "--num-ranks", "8", "--policy", "deepseek,magic"],
         "unknown policy 'magic'"),
        (["simulate", "--synthetic", "steps=oops", "--num-ranks", "8"], "--synthetic"),
        (["simulate", "--synthetic", "default", "--num-ranks", "8", "--window-size", "0"],
         "--window-size"),
        (["simulate", "--num-ranks", "8"], "--trace"),
        (["simulate", "--synthetic", "default", "--num-ranks", "8", "--eplb-config",
          '{"rebalance_trigger": "often"}'], "--eplb-config: rebalance_trigger must be one of"),
        (["simulate", "--synthetic", "default", "--num-ranks", "eight"], "--num-ranks"),
        (["rebalance", "--load", "LOAD", "--num-ranks", "5"], "must divide"),
        (["rebalance", "--load", "LOAD", "--num-ranks", "4", "--policy", "nope"], "unknown policy"),
        (["rebalance", "--load", "missing.npy", "--num-ranks", "4"], "--load"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    np.save(tmp_path / "load.npy", README_LOAD)
    argv = [str(tmp_path / "load.npy") if a == "LOAD" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_wrong_trace_shape_via_subprocess(tmp_path):
    np.savez(tmp_path / "bad.npz", load=np.zeros((10, 8), dtype=np.int64))
    proc = subprocess.run(
        [sys.executable, "-m", "eplb", "simulate", "--trace", str(tmp_path / "bad.npz"),
         "--num-ranks", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "3-D" in proc.stderr
    good = synthetic_trace(SyntheticSpec(steps=20, layers=1, experts=6))
    save_trace(tmp_path / "good.npz", good)
    proc = subprocess.run(
        [sys.executable, "-m", "eplb", "simulate", "--trace", str(tmp_path / "good.npz"),
         "--num-ranks", "4", "--num-redundant", "2", "--window-size", "5", "--step-interval", "5"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
