"""`eplb serve` flag validation: every bad flag exits 2 with one line, before any rank starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from eplb.cli import main as cli_main


@pytest.fixture(scope="module")
def fake_model_dir(tmp_path_factory) -> Path:
    # validation only reads config.json; no weights are needed to be rejected
    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0}))
    return d


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--eplb-config", '{"window_sise": 5}'], "window_sise"),
        (["--eplb-config", '{"step_interval": 0}'], "step_interval"),
        (["--eplb-config", "{not json"], "not valid JSON"),
        (["--all2all-backend", "mpi"], "allgather_reducescatter"),
        (["--data-parallel-size", "0"], "--data-parallel-size"),
        (["--data-parallel-size", "3"], "must divide"),
        (["--max-model-len", "0"], "--max-model-len"),
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "invalid int value"),
        (["--dtype", "int8"], "invalid choice"),
        (["--max-request-bytes", "0"], "--max-request-bytes"),
        (["--drain-timeout", "-1"], "--drain-timeout"),
        (["--stream-interval", "0"], "--stream-interval"),
        (["--max-cudagraph-capture-size", "0"], "--max-cudagraph-capture-size"),
        (["--uvicorn-http", "fast"], "invalid choice"),
    ],
)
def test_bad_flag_exits_2_with_one_line(fake_model_dir, flags, needle, capsys):
    base = ["serve", str(fake_model_dir), "--enable-expert-parallel", "--enable-eplb"]
    rc, err = _run(base + flags, capsys)
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


def test_uvicorn_loop_that_is_not_installed_names_the_flag(fake_model_dir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    rc, err = _run(["serve", str(fake_model_dir), "--uvicorn-loop", "uvloop"], capsys)
    assert rc == 2 and "--uvicorn-loop uvloop" in err and "asyncio" in err


def test_eplb_needs_expert_parallel(fake_model_dir, capsys):
    rc, err = _run(["serve", str(fake_model_dir), "--enable-eplb"], capsys)
    assert rc == 2 and "--enable-expert-parallel" in err


def test_eplb_config_needs_enable_eplb(fake_model_dir, capsys):
    rc, err = _run(["serve", str(fake_model_dir), "--eplb-config", "{}"], capsys)
    assert rc == 2 and "--enable-eplb" in err


def test_missing_model_dir(tmp_path, capsys):
    rc, err = _run(["serve", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "not a model directory" in err


def test_port_in_use(fake_model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, err = _run(["serve", str(fake_model_dir), "--port", str(s.getsockname()[1])], capsys)
    assert rc == 2 and "cannot bind" in err


def test_help_documents_every_issue_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--data-parallel-size", "--enable-expert-parallel",
                 "--enable-eplb", "--eplb-config", "--all2all-backend", "--max-model-len",
                 "--max-num-seqs", "--dtype", "--device", "--seed", "--served-model-name",
                 "--api-key", "--enforce-eager", "--trust-remote-code", "--max-request-bytes",
                 "--drain-timeout", "--stream-interval"):
        assert flag in out, flag
