"""The Triton compile counter: its hook counts each compilation by kernel name and keeps the hook
that was set before it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eplb.kernels import compile_log

knobs = pytest.importorskip("triton").knobs


def test_install_counts_compiles_and_chains_the_previous_hook(monkeypatch):
    before = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: before.append(kw["fn"]))
    monkeypatch.setattr(compile_log, "_installed", False)
    monkeypatch.setattr(compile_log, "_names", [])
    start = compile_log.count()
    assert compile_log.install() and compile_log.install()  # the second call changes nothing
    knobs.runtime.jit_post_compile_hook(key=None, repr="", fn=SimpleNamespace(name="_gemm1_kernel"), compile={},
                                        is_manual_warmup=False, already_compiled=False)
    knobs.runtime.jit_post_compile_hook(key=None, repr="", fn=None, compile={}, is_manual_warmup=False,
                                        already_compiled=False)
    assert compile_log.since(start) == ["_gemm1_kernel", "?"]
    assert compile_log.count() == start + 2
    assert [getattr(fn, "name", None) for fn in before] == ["_gemm1_kernel", None]  # still called
