"""Model download from ModelScope or Hugging Face into lfw's cache. The hub clients are imported
only when a download actually happens, so everything else works where they are not installed."""

from __future__ import annotations

from pathlib import Path


def cached_model_dir(hub: str, model_id: str, root: Path) -> Path:
    """Where a hub model lives once downloaded (no network). hub "pypi" is the demo model
    (wrapper.demo_model), fetched from PyPI data packages and converted from GGUF."""
    return root / "models" / hub / model_id
