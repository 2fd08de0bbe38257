"""`eplb serve [MODEL]`: the OpenAI-compatible server (flags named like vLLM's).

Every flag is checked before any rank process starts; a bad one exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eplb.cli_common import UsageError, fail, one_line_errors
from eplb.config import ALL2ALL_BACKENDS, EPLBConfig, ParallelConfig
from eplb.resources import DEFAULT_MODEL_NAME, default_model_path
from eplb.runtime.heartbeat import DEFAULT_STALL_TIMEOUT_S
from eplb.server.context import DEFAULT_DRAIN_S, DEFAULT_MAX_REQUEST_BYTES

DEFAULT_MODEL = DEFAULT_MODEL_NAME  # the shipped model, installed with the package
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
UVICORN_LOOPS = ("auto", "asyncio", "uvloop")
UVICORN_HTTP = ("auto", "h11", "httptools")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser, "eplb serve")  # argparse's default prints the usage too
    parser.add_argument("model", nargs="?", default=None,
                        help=f"model directory (HF layout); default: the shipped {DEFAULT_MODEL}")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="bind port (default: %(default)s)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use in 'model' (default: the MODEL argument)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise)")
    g = parser.add_argument_group("parallelism and EPLB")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="DP ranks, one process each; requests go to the least-loaded rank "
                        "(default: %(default)s)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="shard experts over the DP ranks (EP size = DP size)")
    g.add_argument("--enable-eplb", action="store_true",
                   help="expert-parallel load balancing (needs --enable-expert-parallel)")
    g.add_argument("--eplb-config", default=None, metavar="JSON",
                   help="EPLB settings as JSON, vLLM keys, e.g. "
                        "'{\"window_size\":20,\"step_interval\":100,\"use_async\":true}'")
    g.add_argument("--all2all-backend", choices=ALL2ALL_BACKENDS, default=ALL2ALL_BACKENDS[0],
                   help="how tokens reach the experts' ranks (default: %(default)s)")
    g.add_argument("--data-parallel-address", default="127.0.0.1", metavar="HOST",
                   help="rendezvous address of DP rank 0, for several nodes (default: %(default)s)")
    g.add_argument("--data-parallel-rpc-port", type=int, default=0, metavar="PORT",
                   help="rendezvous port of DP rank 0 (default: 0 = a free port, one node only)")
    g.add_argument("--data-parallel-size-local", type=int, default=None, metavar="N",
                   help="DP ranks started on this node (default: all of them)")
    g.add_argument("--node-rank", type=int, default=0,
                   help="this node's index when the DP ranks span several nodes (default: 0)")
    g.add_argument("--data-parallel-start-rank", type=int, default=None, metavar="RANK",
                   help="first DP rank of this node (default: node rank x "
                        "--data-parallel-size-local)")
    g.add_argument("--headless", action="store_true",
                   help="run this node's DP ranks without the HTTP API (a node of a multi-node "
                        "job whose requests come through another node's front)")
    g.add_argument("--rank-stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                   metavar="SECONDS",
                   help="a DP rank that makes no progress for this long (hung, or waiting on a "
                        "hung peer) breaks the server: /health turns 503, open requests fail, "
                        "the server exits with code 1 (default: %(default)s)")
    g.add_argument("--record-trace", "--eplb-record-trace", dest="record_trace", default=None,
                   metavar="PATH",
                   help="write the per-step expert load trace here (for eplb simulate)")
    e = parser.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=2048,
                   help="max prompt + generated tokens per request (default: %(default)s)")
    e.add_argument("--max-num-seqs", type=int, default=64,
                   help="max requests decoded together per rank (default: %(default)s)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="max tokens per forward step per rank (default: the engine's)")
    e.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight/activation dtype; auto = the checkpoint's on GPU, float32 on CPU")
    e.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto = cuda when available, else cpu (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="engine seed (default: %(default)s)")
    e.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: every step runs eagerly")
    e.add_argument("--max-cudagraph-capture-size", type=int, default=None, metavar="TOKENS",
                   help="the largest step replayed from CUDA graphs, in tokens: steps that mix "
                        "decodes with short prefill chunks up to this size replay too, without EP "
                        "(default: min(2048, --max-num-batched-tokens); --max-num-seqs or less: "
                        "decode-only steps only)")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="a step on the CUDA graphs (decodes, with or without short prompt chunks) "
                        "schedules and launches the next one before the host reads its tokens, so "
                        "scheduling and output work overlap the GPU (vLLM's name; without EP; default: on)")
    e.add_argument("--quantization", "-q", choices=("fp8", "none"), default=None,
                   help="default: a block-FP8 checkpoint runs the FP8 kernels where they can run "
                        "(CUDA sm >= 8.9, triton, bfloat16) and is dequantized elsewhere; fp8: insist "
                        "on the FP8 kernels; none: always dequantize to --dtype")
    e.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="auto: read the safetensors; dummy: random weights of config.json's shapes, "
                        "made on the device (default: %(default)s)")
    e.add_argument("--dummy-router-skew", type=float, nargs="?", const=1.5, default=None, metavar="ZIPF_S",
                   help="with --load-format dummy: bias each router toward a Zipf(ZIPF_S)-ranked window "
                        "of hot experts (given alone: 1.5, balancedness ~0.5 at EP 2; docs/model.md)")
    e.add_argument("--dummy-router-drift", type=int, default=None, metavar="STEPS",
                   help="forward steps per one-expert move of the hot window (default 200; 0 = static)")
    e.add_argument("--dummy-router-trace", default=None, metavar="NPZ",
                   help="with --load-format dummy: route by a recorded load trace instead (a file of "
                        "--record-trace: step t follows the trace's step t mod its length; docs/model.md)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM compatibility; no remote code is ever run")
    e.add_argument("--chat-template", default=None,
                   help="Jinja chat template (file or inline); default: the tokenizer's own, "
                        "else plain 'role: content' lines")
    o = parser.add_argument_group("server")
    o.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="log level (default: %(default)s)")
    o.add_argument("--access-log", action="store_true", help="log every HTTP request")
    o.add_argument("--uvicorn-loop", choices=UVICORN_LOOPS, default="auto",
                   help="uvicorn's event loop (default: %(default)s = uvloop when installed)")
    o.add_argument("--uvicorn-http", choices=UVICORN_HTTP, default="auto",
                   help="uvicorn's HTTP parser (default: %(default)s = httptools when installed)")
    o.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="a streamed request gets a chunk with its first token, then every N "
                        "tokens, and with its last: N > 1 costs the server N times less CPU per "
                        "token, at coarser streaming (default: %(default)s)")
    o.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="N", help="larger request bodies answer 413 unread "
                                     "(default: %(default)s = 4 MiB)")
    o.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, time open requests get to finish before each ends "
                        "with a 503 error (default: %(default)s)")


def resolve_model(model: str | None) -> Path:
    path = Path(model) if model is not None else default_model_path()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"MODEL {str(path)!r} is not a model directory (no config.json there)")
    return path


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"--port {port}: cannot bind {host}:{port} ({exc.strerror})") from None


@dataclass(frozen=True)
class ServeConfig:
    """What the engine client and the app need, from validated flags."""

    model_path: Path
    engine_kwargs: dict[str, Any]  # EngineCore keyword arguments, passed to every rank
    parallel: ParallelConfig
    eplb: EPLBConfig | None
    chat_template: Any
    vocab_size: int
    served: list[str]  # served model names


def build_configs(args: argparse.Namespace) -> ServeConfig:
    """Validates every flag; returns what the engine client and the app need. UsageError if bad."""
    model_path = resolve_model(args.model)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not args.rank_stall_timeout > 0:
        raise UsageError(f"--rank-stall-timeout must be > 0, got {args.rank_stall_timeout}")
    for flag in ("data_parallel_size", "max_model_len", "max_num_seqs"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag, value, choices in (("--uvicorn-loop", args.uvicorn_loop, UVICORN_LOOPS),
                                 ("--uvicorn-http", args.uvicorn_http, UVICORN_HTTP)):
        if value in ("uvloop", "httptools") and importlib.util.find_spec(value) is None:
            raise UsageError(f"{flag} {value}: the {value} package is not installed "
                             f"(allowed: {', '.join(choices)})")
    if args.stream_interval < 1:
        raise UsageError(f"--stream-interval must be an integer >= 1, got {args.stream_interval}")
    if args.max_request_bytes < 1:
        raise UsageError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if not 0 <= args.drain_timeout <= 3600:
        raise UsageError(f"--drain-timeout must be in [0, 3600] seconds, got {args.drain_timeout}")
    if args.max_num_batched_tokens is not None and args.max_num_batched_tokens < 1:
        raise UsageError(f"--max-num-batched-tokens must be >= 1, got {args.max_num_batched_tokens}")
    if args.max_cudagraph_capture_size is not None and args.max_cudagraph_capture_size < 1:
        raise UsageError(f"--max-cudagraph-capture-size must be >= 1, got {args.max_cudagraph_capture_size}")
    if args.enable_eplb and not args.enable_expert_parallel:
        raise UsageError("--enable-eplb needs --enable-expert-parallel")
    if args.eplb_config is not None and not args.enable_eplb:
        raise UsageError("--eplb-config is given but --enable-eplb is not")
    eplb: EPLBConfig | None = None
    if args.enable_eplb:
        try:
            eplb = EPLBConfig.from_json(args.eplb_config) if args.eplb_config else EPLBConfig()
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--eplb-config: {exc}") from None
    try:
        parallel = ParallelConfig(data_parallel_size=args.data_parallel_size,
                                  enable_expert_parallel=args.enable_expert_parallel,
                                  all2all_backend=args.all2all_backend,
                                  data_parallel_address=args.data_parallel_address,
                                  data_parallel_rpc_port=args.data_parallel_rpc_port,
                                  data_parallel_size_local=args.data_parallel_size_local,
                                  node_rank=args.node_rank,
                                  data_parallel_start_rank=args.data_parallel_start_rank)
        from eplb.parallel.groups import resolve_rendezvous

        resolve_rendezvous(parallel)  # node layout errors name the flag, before any rank starts
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        from eplb.model.config import load_config

        mcfg = load_config(str(model_path))
    except ValueError as exc:
        raise UsageError(f"MODEL {str(model_path)!r}: {exc}") from None
    try:
        parallel.check_expert_slots(mcfg.num_experts, eplb.num_redundant_experts if eplb else 0)
    except ValueError as exc:
        raise UsageError(f"--{exc}".replace("data_parallel_size", "data-parallel-size", 1)) from None
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        # CPU: float32 (bf16 matmuls there are slow and lose accuracy); GPU: the checkpoint's
        stored = mcfg.raw.get("torch_dtype") or mcfg.raw.get("dtype")
        dtype = "float32" if device == "cpu" else (
            stored if stored in ("float32", "bfloat16", "float16") else "bfloat16")
    try:
        from eplb.server.chat_template import load_template

        chat_template = load_template(args.chat_template)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if not args.headless:
        _check_port_free(args.host, args.port)
    engine_kwargs: dict[str, Any] = {"dtype": dtype, "device": device,
                                     "max_model_len": args.max_model_len,
                                     "max_num_seqs": args.max_num_seqs, "seed": args.seed,
                                     "enforce_eager": args.enforce_eager,
                                     "async_scheduling": args.async_scheduling}
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_cudagraph_capture_size is not None:
        engine_kwargs["max_graph_tokens"] = args.max_cudagraph_capture_size
    if args.load_format != "auto":
        engine_kwargs["load_format"] = args.load_format
    skew_args = (args.dummy_router_skew, args.dummy_router_drift, args.dummy_router_trace)
    if any(a is not None for a in skew_args):
        if args.load_format != "dummy":
            raise UsageError("--dummy-router-skew/--dummy-router-drift/--dummy-router-trace need --load-format dummy")
        from eplb.model.dummy import router_skew

        try:  # checks the values and reads the trace once here, so a bad one fails before any rank starts
            router_skew(args.dummy_router_skew, args.dummy_router_drift, trace=args.dummy_router_trace)
        except ValueError as exc:
            msg = str(exc)
            for name in ("dummy_router_skew", "dummy_router_drift", "dummy_router_trace"):
                msg = msg.replace(name, "--" + name.replace("_", "-"))
            raise UsageError(msg) from None
        engine_kwargs["dummy_router_skew"] = args.dummy_router_skew
        engine_kwargs["dummy_router_drift"] = args.dummy_router_drift
        if args.dummy_router_trace is not None:
            engine_kwargs["dummy_router_trace"] = os.path.abspath(args.dummy_router_trace)
    if args.quantization == "none":
        engine_kwargs["quantization"] = "none"
    elif args.quantization is not None:
        from eplb.model.loader import check_quantization, resolve_dtype

        try:  # device, triton, dtype and checkpoint checked here, before any rank starts
            check_quantization(args.quantization, device, resolve_dtype(dtype), mcfg)
        except ValueError as exc:
            raise UsageError(f"--{exc}") from None
        engine_kwargs["quantization"] = args.quantization
    return ServeConfig(model_path=model_path, engine_kwargs=engine_kwargs, parallel=parallel,
                       eplb=eplb, chat_template=chat_template, vocab_size=mcfg.vocab_size,
                       served=args.served_model_name or [args.model or DEFAULT_MODEL])


def main(args: argparse.Namespace) -> int:
    try:
        cfg = build_configs(args)
    except UsageError as exc:
        return fail("eplb serve", str(exc))
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from eplb.runtime.dp_client import DPEngineClient
    from eplb.server.app import ServerSettings, create_app

    engine = DPEngineClient(str(cfg.model_path), cfg.engine_kwargs, cfg.parallel,
                            cfg.eplb, record_trace=args.record_trace,
                            stall_timeout_s=args.rank_stall_timeout)
    if args.headless:
        return _run_headless(engine)

    def fatal(_: object) -> None:  # the engine failed (at start or later): stop, exit 1
        server.should_exit = True  # bound below; the app calls this only once uvicorn runs

    settings = ServerSettings(served_model_names=cfg.served,
                              max_model_len=args.max_model_len, api_key=args.api_key,
                              chat_template=cfg.chat_template, vocab_size=cfg.vocab_size,
                              max_request_bytes=args.max_request_bytes,
                              drain_s=args.drain_timeout, stream_interval=args.stream_interval,
                              on_fatal=fatal)
    app = create_app(engine, settings)
    server = _draining_server(app, args)
    engine.on_fatal(fatal)  # a rank died or hung: the open requests already failed; exit 1
    logging.getLogger("eplb.server").info(
        "starting %d rank(s) of %s (EP %s, EPLB %s, backend %s) on http://%s:%d",
        args.data_parallel_size, cfg.model_path, "on" if args.enable_expert_parallel else "off",
        cfg.eplb.to_dict() if cfg.eplb else "off", args.all2all_backend, args.host, args.port)
    try:
        server.run()  # SIGTERM/SIGINT: drain, then the app's shutdown stops the ranks
    finally:
        engine.shutdown()  # idempotent; the app's shutdown already did it on a clean exit
    state = app.state.eplb
    if state.start_error is not None:
        print(f"eplb serve: error: engine failed to start: {state.start_error!r}", file=sys.stderr)
        return 1
    code = _engine_exit_code(engine)
    if code == 0 and server.exit_signal is not None:
        return 128 + server.exit_signal  # as a process killed by it would, but after cleanup
    return code


def _draining_server(app: Any, args: argparse.Namespace) -> Any:
    """uvicorn's server, changed in two ways: a signal starts the app's drain (open requests get
    ``--drain-timeout`` seconds, then each ends with a 503 / SSE error event), and the signal is
    not raised again after shutdown (uvicorn does that, and the process then dies before its exit
    handlers run: multiprocessing's semaphores leak). main() returns 128 + signal instead."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        exit_signal: int | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.exit_signal is None:
                self.exit_signal = int(sig)
                app.state.eplb.lifecycle.begin_drain(args.drain_timeout)
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    # uvicorn's own grace period only backs up the drain: requests end by themselves before it
    return DrainingServer(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        access_log=args.access_log, timeout_graceful_shutdown=args.drain_timeout + 10,
        lifespan="on", loop=args.uvicorn_loop, http=args.uvicorn_http))


def _engine_exit_code(engine: Any) -> int:
    """1 if the engine broke (a supervisor should restart the server), else 0."""
    if engine.error is not None:
        print(f"eplb serve: error: {engine.error.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _run_headless(engine: Any) -> int:
    """A node without the HTTP API: its ranks serve the requests other nodes' fronts send them
    through the collectives. Runs until SIGTERM/SIGINT, another node stops the job, or the
    engine breaks."""
    import signal
    import threading

    done = threading.Event()
    engine.on_fatal(lambda _: done.set())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    log = logging.getLogger("eplb.server")
    try:
        engine.start()
    except RuntimeError as exc:
        print(f"eplb serve: error: engine failed to start: {exc}", file=sys.stderr)
        engine.shutdown()
        return 1
    log.info("headless: DP ranks %s ready; no HTTP API on this node", engine.rank_ids)
    while not done.wait(0.5):  # a timed wait keeps signal handlers responsive
        pass
    engine.shutdown()
    return _engine_exit_code(engine)
