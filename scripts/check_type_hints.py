"""Lint: every public function of the package has type hints (its arguments and its return).

Public = a module-level function or a method of a module-level class, neither named with a
leading underscore (``__init__`` and ``__call__`` count as public; ``__init__`` needs no return
hint). Triton kernels (``@triton.jit``) are exempt: their arguments are typed by the launch.
    python scripts/check_type_hints.py [ROOT=src]      exits 1 and lists what lacks hints
"""
from __future__ import annotations

import ast
import pathlib
import sys

PUBLIC_DUNDERS = {"__init__", "__call__"}


def _is_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated ``@triton.jit`` or ``@triton.jit(...)``."""
    return any(ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in fn.decorator_list)


def _missing(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    a = fn.args
    params = a.posonlyargs + a.args + a.kwonlyargs
    if method and params and "staticmethod" not in {ast.unparse(d) for d in fn.decorator_list}:
        params = params[1:]  # self / cls
    out = [p.arg for p in params if p.annotation is None]
    out += [f"*{v.arg}" for v in (a.vararg,) if v is not None and v.annotation is None]
    out += [f"**{v.arg}" for v in (a.kwarg,) if v is not None and v.annotation is None]
    if fn.returns is None and fn.name != "__init__":
        out.append("return")
    return out


def _public(name: str) -> bool:
    return not name.startswith("_") or name in PUBLIC_DUNDERS


def check_file(path: pathlib.Path) -> list[str]:
    """``path:line name: missing a, b`` for each public function of the file that lacks hints."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        members = [(node, False)] if isinstance(node, funcs) else []
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            members = [(m, True) for m in node.body if isinstance(m, funcs)]
        for fn, method in members:
            if not _public(fn.name) or _is_kernel(fn):
                continue
            miss = _missing(fn, method)
            if miss:
                found.append(f"{path}:{fn.lineno} {fn.name}: missing {', '.join(miss)}")
    return found


def main(argv: list[str]) -> int:
    root = pathlib.Path(argv[1] if len(argv) > 1 else "src")
    problems = [p for f in sorted(root.rglob("*.py")) for p in check_file(f)]
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} public function(s) without type hints", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
