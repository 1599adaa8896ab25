"""Where the app's bundled files are. A leaf (imports nothing of the project), so any module can name them."""

from __future__ import annotations

from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_DIR / "presets"
