"""Chat messages -> prompt text, and text -> token ids, for whatever tokenizer the engine has.

Template order: ``--chat-template`` (a file path or an inline Jinja string), else the tokenizer's
own ``chat_template``, else ``FALLBACK_TEMPLATE`` (plain ``role: content`` lines) so a base model
without a template still answers chat requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def load_template(spec: str | None) -> str | None:
    """``spec`` is a path to a Jinja file or the template itself; None passes through."""
    if spec is None:
        return None
    path = Path(spec)
    if len(spec) < 4096 and path.is_file():
        return path.read_text()
    if "{" not in spec:
        raise ValueError(f"--chat-template: {spec!r} is neither a file nor a Jinja template")
    return spec


class ChatFormatter:
    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        self.uses_tokenizer_template = template is None and isinstance(own, str) and bool(own)
        source = template if template is not None else (own if self.uses_tokenizer_template
                                                         else FALLBACK_TEMPLATE)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)  # compile once: a syntax error shows at startup

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        tok = self.tokenizer
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=_special(tok, "bos_token"),
            eos_token=_special(tok, "eos_token"),
        )


def _raise(message: str) -> None:
    raise ValueError(message)


def _special(tok: Any, name: str) -> str:
    value = getattr(tok, name, None)
    return value if isinstance(value, str) else ""


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` for a transformers tokenizer or a ``tokenizers.Tokenizer``."""
    out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = getattr(out, "ids", out)  # tokenizers.Encoding has .ids; transformers returns a list
    return [int(i) for i in ids]
