"""Triton compilations, counted: a kernel variant compiled inside a serving step stalls that step
for 0.5-3 s on a GPU, so the warm-up compiles what steps use and a slow step names what compiled
in it (``eplb.runtime.dp_worker``). ``install()`` chains triton's post-compile hook; the counts
are per process."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_names: list[str] = []
_installed = False


def install() -> bool:
    """Count every Triton compilation from now on in this process (idempotent; keeps any hook
    set before). False when triton or its hook is not there (then nothing is counted)."""
    global _installed
    if _installed:
        return True
    try:
        from triton import knobs
    except ImportError:  # no triton, or one without knobs (< 3.4)
        return False
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args: object, **kwargs: object) -> object:
        record(getattr(kwargs.get("fn"), "name", None) or "?")
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    _installed = True
    return True


def record(name: str) -> None:
    """One compilation of kernel ``name`` (what the hook calls)."""
    with _lock:
        _names.append(name)


def count() -> int:
    """Compilations counted so far."""
    return len(_names)


def since(start: int) -> list[str]:
    """Names of the kernels compiled after ``count()`` was ``start``, in order."""
    with _lock:
        return list(_names[start:])
