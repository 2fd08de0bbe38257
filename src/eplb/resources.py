"""Files shipped inside the package: the tiny model and the synthetic GSM8K data.

They live under ``src/eplb/assets/`` and install with the package (package data), so they are found
the same way from a checkout, an editable install and a wheel::

    assets/models/tiny-qwen3-moe/        the model `eplb serve` runs by default (HF layout)
    assets/data/synthetic_gsm8k_*.jsonl  the word problems it was trained and is evaluated on
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_NAME = "tiny-qwen3-moe"


def assets_dir() -> Path:
    """The installed ``eplb/assets`` folder, as a filesystem path (the model loader needs one)."""
    path = resources.files("eplb") / "assets"
    if not isinstance(path, Path):  # e.g. imported from a zip: there is no folder to hand out
        raise RuntimeError(f"eplb's shipped files are not on the filesystem ({path!r}); "
                           "install eplb as a regular (unzipped) package")
    return path


def default_model_path() -> Path:
    """The shipped model directory: ``eplb/assets/models/tiny-qwen3-moe``."""
    return assets_dir() / "models" / DEFAULT_MODEL_NAME


def data_dir() -> Path:
    """The shipped data folder: ``eplb/assets/data`` (``synthetic_gsm8k_{train,test}.jsonl``)."""
    return assets_dir() / "data"
