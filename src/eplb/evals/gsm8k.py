"""GSM8K evaluation client for any OpenAI-compatible ``/v1/completions`` server.

It follows vLLM's ``tests/evals/gsm8k/gsm8k_eval.py``: a few-shot prompt of
``Question: ...\\nAnswer: ...`` blocks (``eplb.evals.prompt``), greedy by default, stop at the next
``Question:`` or blank line, score the number after ``####`` (else the last number).

Data sources:
- ``synthetic``: the shipped ``eplb/assets/data/synthetic_gsm8k_{train,test}.jsonl`` (what the
  shipped model was trained on; installed with the package, works offline).
- ``gsm8k``: the public test/train split, downloaded once into a cache directory.
- a local JSONL file in the GSM8K format (``{"question": ..., "answer": "... #### N"}``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from eplb.evals.problems import TEST_FILE, TRAIN_FILE
from eplb.evals.prompt import STOP_STRINGS, build_prompt, extract_answer, reference_answer
from eplb.resources import data_dir

GSM8K_URLS = {
    "test": "https://raw.githubusercontent.com/openai/grade-school-math/master/"
    "grade_school_math/data/test.jsonl",
    "train": "https://raw.githubusercontent.com/openai/grade-school-math/master/"
    "grade_school_math/data/train.jsonl",
}
DATASETS = ("gsm8k", "synthetic")


def cache_dir() -> Path:
    """Where downloaded datasets live: ``$EPLB_CACHE_DIR``, else ``$XDG_CACHE_HOME/eplb``."""
    if os.environ.get("EPLB_CACHE_DIR"):
        return Path(os.environ["EPLB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eplb"


def load_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Records with ``question`` and ``answer`` strings; ValueError naming the line when not."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    records: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not isinstance(
                rec.get("answer"), str
            ):
                raise ValueError(
                    f"{path}:{lineno}: each record needs string fields 'question' and 'answer'"
                )
            records.append(rec)
    return records


def download_gsm8k(split: str, *, timeout_s: float = 30.0) -> Path:
    """Path to the cached public GSM8K ``split`` (test|train), downloading it on first use.

    Raises RuntimeError with a clear way out when the network is unavailable.
    """
    if split not in GSM8K_URLS:
        raise ValueError(f"split must be one of {', '.join(GSM8K_URLS)}, got {split!r}")
    target = cache_dir() / "gsm8k" / f"{split}.jsonl"
    if target.is_file():
        return target
    url = GSM8K_URLS[split]
    try:
        resp = httpx.get(url, timeout=timeout_s, follow_redirects=True)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise RuntimeError(
            f"could not download GSM8K {split} split from {url} ({type(exc).__name__}: {exc}); "
            "use --dataset synthetic or --data-path FILE.jsonl instead"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(resp.content)
    os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    return target


def resolve_data(
    dataset: str, data_path: str | None, shots_path: str | None, num_shots: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Returns (shots, questions).

    Shots are the first ``num_shots`` records of the train file. With ``data_path`` and no
    ``shots_path``: a sibling file whose name has ``test`` replaced by ``train`` if it exists,
    else the first ``num_shots`` records of ``data_path`` itself (then not asked as questions).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    if data_path is not None:
        questions = load_jsonl(data_path)
        if shots_path is None:
            p = Path(data_path)
            sibling = p.with_name(p.name.replace("test", "train"))
            if sibling != p and sibling.is_file():
                shots_path = str(sibling)
            else:
                shots, questions = questions[:num_shots], questions[num_shots:]
                return shots, questions
    elif dataset == "synthetic":
        questions = load_jsonl(data_dir() / TEST_FILE)
        if shots_path is None:
            shots_path = str(data_dir() / TRAIN_FILE)
    else:
        questions = load_jsonl(download_gsm8k("test"))
        if shots_path is None:
            shots_path = str(download_gsm8k("train"))
    shots = load_jsonl(shots_path)[:num_shots] if num_shots else []
    if len(shots) < num_shots:
        raise ValueError(f"num_shots={num_shots} but the shots file has only {len(shots)} records")
    return shots, questions


@dataclass
class EvalConfig:
    base_url: str  # e.g. http://127.0.0.1:8050 (no /v1)
    model: str | None = None  # None = the first model /v1/models lists
    num_questions: int = 1319
    num_shots: int = 5
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 42
    concurrency: int = 32
    api_key: str | None = None
    request_timeout_s: float = 600.0
    retries: int = 3


@dataclass
class EvalResult:
    accuracy: float
    invalid_rate: float
    num_questions: int
    num_shots: int
    latency_s: float
    questions_per_second: float
    num_correct: int
    num_invalid: int
    model: str
    max_tokens: int
    temperature: float
    completion_tokens: int = 0
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "outputs"}
        d["latency"] = self.latency_s  # the key vLLM's script writes
        d["timestamp"] = time.time()
        return d

    def one_line(self) -> str:
        return (
            f"gsm8k: accuracy={self.accuracy:.4f} invalid_rate={self.invalid_rate:.4f} "
            f"questions={self.num_questions} shots={self.num_shots} "
            f"latency={self.latency_s:.1f}s qps={self.questions_per_second:.2f} model={self.model}"
        )


class EvalError(RuntimeError):
    """The server refused or could not be reached; the message says which and why."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _first_model(client: httpx.AsyncClient) -> str:
    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise EvalError(f"cannot reach {client.base_url}/v1/models: {exc!r}") from None
    if resp.status_code != 200:
        raise EvalError(f"GET /v1/models returned {resp.status_code}: {resp.text[:300]}")
    data = resp.json().get("data") or []
    if not data:
        raise EvalError("GET /v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def _complete(client: httpx.AsyncClient, body: dict[str, Any], retries: int) -> dict[str, Any]:
    """POST /v1/completions; retries connection errors and 5xx, fails fast on 4xx."""
    delay = 0.5
    for attempt in range(retries + 1):
        try:
            resp = await client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            if attempt == retries:
                raise EvalError(f"POST /v1/completions failed: {exc!r}") from None
        else:
            if resp.status_code == 200:
                return resp.json()
            if resp.status_code < 500 or attempt == retries:
                raise EvalError(
                    f"POST /v1/completions returned {resp.status_code}: {resp.text[:300]}"
                )
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _same(pred: float | None, label: float) -> bool:
    return pred is not None and math.isclose(pred, label, rel_tol=0.0, abs_tol=1e-6)


async def run_eval(
    cfg: EvalConfig,
    shots: Sequence[dict[str, str]],
    questions: Sequence[dict[str, str]],
    progress: Callable[[int, int, int], None] | None = None,
) -> EvalResult:
    """Ask the first ``cfg.num_questions`` questions, ``cfg.concurrency`` at a time.

    ``progress(done, total, correct)`` is called after each answer.
    """
    if cfg.num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {cfg.num_questions}")
    if cfg.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {cfg.concurrency}")
    if cfg.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {cfg.max_tokens}")
    qs = list(questions[: cfg.num_questions])
    if not qs:
        raise ValueError("the dataset has no questions")
    labels = [reference_answer(q["answer"]) for q in qs]
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/"),
        headers=_headers(cfg.api_key),
        timeout=cfg.request_timeout_s,
        limits=limits,
    ) as client:
        model = cfg.model or await _first_model(client)
        sem = asyncio.Semaphore(cfg.concurrency)
        outputs: list[dict[str, Any] | None] = [None] * len(qs)
        state = {"done": 0, "correct": 0}

        async def one(i: int) -> None:
            body: dict[str, Any] = {
                "model": model,
                "prompt": build_prompt(shots, qs[i]["question"]),
                "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature,
                "stop": STOP_STRINGS,
            }
            if cfg.seed is not None:
                body["seed"] = cfg.seed
            async with sem:
                data = await _complete(client, body, cfg.retries)
            text = data["choices"][0]["text"]
            pred = extract_answer(text)
            ok = _same(pred, labels[i])
            tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
            outputs[i] = {"index": i, "text": text, "pred": pred, "label": labels[i],
                          "correct": ok, "completion_tokens": tokens}
            state["done"] += 1
            state["correct"] += int(ok)
            if progress is not None:
                progress(state["done"], len(qs), state["correct"])

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(i)) for i in range(len(qs))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        latency = time.perf_counter() - start

    done = [o for o in outputs if o is not None]
    n = len(done)
    correct = sum(o["correct"] for o in done)
    invalid = sum(o["pred"] is None for o in done)
    return EvalResult(
        accuracy=correct / n,
        invalid_rate=invalid / n,
        num_questions=n,
        num_shots=len(shots),
        latency_s=latency,
        questions_per_second=n / latency if latency > 0 else float("inf"),
        num_correct=correct,
        num_invalid=invalid,
        model=model,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        completion_tokens=sum(o["completion_tokens"] for o in done),
        outputs=done,
    )


def stderr_progress(every_s: float = 2.0) -> Callable[[int, int, int], None]:
    """A progress printer: a carriage-return line on a terminal, a line every ``every_s`` else."""
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(done: int, total: int, correct: int) -> None:
        now = time.monotonic()
        if not tty and done < total and now - last[0] < every_s:
            return
        last[0] = now
        line = f"[gsm8k] {done}/{total} answered, accuracy so far {correct / done:.3f}"
        if tty:
            sys.stderr.write("\r" + line + ("\n" if done == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show
