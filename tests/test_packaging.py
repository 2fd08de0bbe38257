"""A normal (non-editable) install works: build the wheel, install it into a fresh venv, and from a
folder outside the checkout run `eplb serve` on its default (shipped) model and a short
`eplb eval gsm8k --dataset synthetic` against it.

The fresh venv sees this environment's site-packages through a ``.pth`` line, so torch and the
other dependencies are reused, not downloaded; eplb itself comes only from the wheel (checked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {  # what the installed commands need from the wheel
    "eplb/assets/models/tiny-qwen3-moe/config.json",
    "eplb/assets/models/tiny-qwen3-moe/model.safetensors",
    "eplb/assets/models/tiny-qwen3-moe/tokenizer.json",
    "eplb/assets/data/synthetic_gsm8k_test.jsonl",
    "eplb/assets/data/synthetic_gsm8k_train.jsonl",
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(venv, a work folder outside the checkout, the environment to run its commands in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # build from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    src = tmp / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(src)], cwd=tmp, env=env)
    (wheel,) = dist.glob("eplb-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert names >= SHIPPED, f"missing from the wheel: {sorted(SHIPPED - names)}"

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env).strip())
    # a plain path line: this environment's packages (torch, pip, ...) become importable there,
    # but its own .pth files (an editable eplb) are not processed
    (site / "_outer_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp, env=env)
    work = tmp / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import eplb; print(eplb.__file__)"], cwd=work, env=env).strip()
    assert Path(where).is_relative_to(site), f"eplb imported from {where}, not from the wheel in {site}"
    return venv, work, env


def test_wheel_serves_default_model_and_evals_from_another_folder(installed) -> None:
    venv, work, env = installed
    port = _free_port()
    env = dict(env, OMP_NUM_THREADS="1")
    log_path = work / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(venv / "bin" / "eplb"), "serve", "--port", str(port),
                                   "--device", "cpu"],
                                  cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"server exited {server.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server not healthy in 240 s:\n{log_path.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-qwen3-moe"]

        out = _run([str(venv / "bin" / "eplb"), "eval", "gsm8k", "--dataset", "synthetic",
                    "--port", str(port), "--num-questions", "4", "--save-results", "result.json"],
                   cwd=work, env=env, timeout=240)
        assert out.startswith("gsm8k: accuracy=")
        result = json.loads((work / "result.json").read_text())
        assert result["dataset"] == "synthetic" and result["num_questions"] == 4
        assert result["num_shots"] == 5  # the shots came from the shipped train file
        assert result["accuracy"] >= 0.75, result  # the shipped model solves 0.9985 of them
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
