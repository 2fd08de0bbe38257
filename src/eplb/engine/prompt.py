"""The checks a prompt must pass, shared by the engine (``EngineCore.add_request``) and the
server (which runs them before a request reaches a rank, to answer with a 400 naming the field)."""

from __future__ import annotations


def check_prompt_ids(ids: list[int], max_model_len: int, vocab_size: int | None) -> None:
    """ValueError unless ``ids`` is non-empty, leaves room for one generated token within
    ``max_model_len`` and holds only ids of the vocabulary (``vocab_size`` None: not checked)."""
    if not ids:
        raise ValueError("prompt_token_ids must not be empty")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {max_model_len} "
                         "(room for at least one generated token is needed)")
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
