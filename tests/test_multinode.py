"""Two `eplb serve` processes as two nodes of one job (2 gloo ranks each, DP 4, EP, async EPLB):
both fronts serve the eval at the same time, rebalances complete across nodes, and stopping
node 0 stops node 1 cleanly (scripts/integration/two_node.py does the run; GPUs use the same
script, one GPU per rank)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from eplb.parallel.groups import find_free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "integration" / "two_node.py"


def test_two_nodes_serve_one_job_with_async_rebalances(tmp_path):
    port = find_free_port()
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dp-size", "4", "--num-questions", "40",
         "--threshold", "0.9", "--concurrency", "8", "--port", str(port),
         "--eplb-config", '{"window_size":10,"step_interval":20,"use_async":true}',
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "two_node.json").read_text())
    assert out.returncode == 0 and report["ok"], (report, out.stdout[-2000:])
    evals = report["evals"]
    assert [e["accuracy"] for e in evals] == [evals[0]["accuracy"]] * 2
    # each front served the same 40 questions: the same answers, token for token
    texts = [[json.loads(line)["text"]
              for line in (tmp_path / f"outputs-node{n}.jsonl").read_text().splitlines()]
             for n in (0, 1)]
    assert len(texts[0]) == 40 and texts[0] == texts[1]
    assert report["rebalances"] >= 1 and report["copies_moved"] > 0
    assert report["rebalances_failed"] == 0
    assert report["exit_node1"] == 0 and not report["leftover_processes"]
