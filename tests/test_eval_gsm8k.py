"""`eplb eval gsm8k` against a stand-in OpenAI-compatible server (stdlib http.server).

The stand-in answers from a table, so accuracy, invalid rate, the prompt format and the request
fields can be checked exactly; it also counts requests in flight to check --concurrency.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eplb.cli import main as cli_main
from eplb.evals import gsm8k
from eplb.evals.prompt import STOP_STRINGS


def _record(i: int) -> dict[str, str]:
    return {"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
            "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}


class FakeOpenAI:
    """Answers question i: right if i % 4 in (0, 1), wrong number if 2, no number at all if 3."""

    def __init__(self, delay_s: float = 0.0, status: int = 200, model: str = "fake-model"):
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.delay_s = delay_s
        self.status = status
        self.model = model
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.model}]})
                else:
                    self._send(404, {"error": {"message": "nope"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.bodies.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                time.sleep(fake.delay_s)
                # out of flight before the reply goes out: once the client has it, it may send
                # its next request, which must not find this one still counted
                with fake.lock:
                    fake.in_flight -= 1
                if fake.status != 200:
                    self._send(fake.status, {"error": {"message": "bad model"}})
                    return
                q = body["prompt"].rsplit("Question: ", 1)[1]
                i = int(q.split("Tom has ", 1)[1].split(" ", 1)[0])
                right = 2 * i + 2
                text = {0: f" {i} + {i + 2} = {right}\n#### {right}",
                        1: f" so it is {right}",
                        2: f" {i} + {i + 2} = 7\n#### {right + 1}",
                        3: " I do not know"}[i % 4]
                self._send(200, {"id": "x", "object": "text_completion", "model": body["model"],
                                 "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 3,
                                           "total_tokens": 13}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def data_files(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "my_train.jsonl"
    test = tmp_path / "my_test.jsonl"
    train.write_text("".join(json.dumps(_record(100 + i)) + "\n" for i in range(8)))
    test.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(40)))
    return train, test


def test_accuracy_prompt_and_request_fields(data_files, tmp_path):
    train, test = data_files
    out = tmp_path / "res" / "result.json"
    with FakeOpenAI(delay_s=0.02) as fake:
        rc = cli_main(["eval", "gsm8k", "--host", "http://127.0.0.1", "--port", str(fake.port),
                       "--data-path", str(test), "--num-questions", "24", "--num-shots", "3",
                       "--max-tokens", "50", "--concurrency", "4", "--seed", "7",
                       "--save-results", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    # questions 0..23: i%4 in {0,1} right (12), i%4==3 invalid (6)
    assert res["num_questions"] == 24
    assert res["accuracy"] == pytest.approx(12 / 24)
    assert res["invalid_rate"] == pytest.approx(6 / 24)
    assert res["num_shots"] == 3
    assert res["model"] == "fake-model"
    assert res["latency_s"] > 0 and res["questions_per_second"] > 0
    assert len(fake.bodies) == 24
    assert 1 < fake.max_in_flight <= 4
    b = fake.bodies[0]
    assert b["model"] == "fake-model" and b["max_tokens"] == 50 and b["temperature"] == 0.0
    assert b["stop"] == STOP_STRINGS and b["seed"] == 7
    # the sibling my_train.jsonl supplies the shots: its first 3 records, then the question
    shots = [_record(100 + i) for i in range(3)]
    prompts = {body["prompt"] for body in fake.bodies}
    expected0 = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + (
        f"Question: {_record(0)['question']}\nAnswer:")
    assert expected0 in prompts


def test_shots_from_data_file_when_no_train_sibling(tmp_path):
    only = tmp_path / "questions.jsonl"
    only.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(10)))
    shots, questions = gsm8k.resolve_data("gsm8k", str(only), None, 2)
    assert shots == [_record(0), _record(1)]
    assert questions[0] == _record(2) and len(questions) == 8


def test_server_error_is_reported_not_scored(data_files, capsys):
    _, test = data_files
    with FakeOpenAI(status=404) as fake:
        rc = cli_main(["eval", "gsm8k", "--port", str(fake.port), "--data-path", str(test),
                       "--num-questions", "3", "--model", "other", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "404" in err and "bad model" in err


def test_unreachable_server(data_files, capsys):
    _, test = data_files
    with FakeOpenAI() as fake:
        port = fake.port  # closed once the block exits
    rc = cli_main(["eval", "gsm8k", "--port", str(port), "--data-path", str(test),
                   "--num-questions", "2", "--quiet"])
    assert rc == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--num-questions", "0"], "--num-questions"),
        (["--concurrency", "0"], "--concurrency"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--num-shots", "-1"], "--num-shots"),
        (["--host", "127.0.0.1"], "scheme"),
        (["--data-path", "/nonexistent/x.jsonl"], "not found"),
    ],
)
def test_bad_arguments_exit_2(extra, needle, capsys):
    rc = cli_main(["eval", "gsm8k", "--quiet", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_bad_jsonl_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record(1)) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'answer'"):
        gsm8k.load_jsonl(bad)


def test_gsm8k_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EPLB_CACHE_DIR", str(tmp_path / "cache"))
    # a port nothing listens on stands in for "no network"
    monkeypatch.setattr(gsm8k, "GSM8K_URLS", {"test": "http://127.0.0.1:9/test.jsonl",
                                              "train": "http://127.0.0.1:9/train.jsonl"})
    with pytest.raises(RuntimeError, match="could not download GSM8K test.*--dataset synthetic"):
        gsm8k.resolve_data("gsm8k", None, None, 5)


def test_gsm8k_uses_cache_without_network(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gsm8k").mkdir(parents=True)
    (cache / "gsm8k" / "test.jsonl").write_text(json.dumps(_record(3)) + "\n")
    (cache / "gsm8k" / "train.jsonl").write_text(json.dumps(_record(9)) + "\n")
    monkeypatch.setenv("EPLB_CACHE_DIR", str(cache))
    monkeypatch.setattr(gsm8k, "GSM8K_URLS", {"test": "http://127.0.0.1:9/t", "train": "http://127.0.0.1:9/t"})
    shots, questions = gsm8k.resolve_data("gsm8k", None, None, 1)
    assert shots == [_record(9)] and questions == [_record(3)]


def test_synthetic_uses_shipped_data_files(monkeypatch, tmp_path):
    (tmp_path / "synthetic_gsm8k_train.jsonl").write_text(json.dumps(_record(5)) + "\n")
    (tmp_path / "synthetic_gsm8k_test.jsonl").write_text(json.dumps(_record(6)) + "\n")
    monkeypatch.setattr(gsm8k, "data_dir", lambda: tmp_path)
    assert gsm8k.resolve_data("synthetic", None, None, 1) == ([_record(5)], [_record(6)])


def test_cli_subprocess_prints_one_line_summary(data_files):
    _, test = data_files
    with FakeOpenAI() as fake:
        proc = subprocess.run(
            [sys.executable, "-m", "eplb", "eval", "gsm8k", "--port", str(fake.port),
             "--data-path", str(test), "--num-questions", "8", "--num-shots", "2"],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gsm8k: accuracy=0.5000 ")
    assert "[gsm8k] 8/8 answered" in proc.stderr  # progress
