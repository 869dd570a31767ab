"""Shared fixtures: paths of the real scans and reference values.

The real scans and the reference values live in ``../shared`` beside the
repository and are never committed. Tests that need them skip when that
folder is absent, so a fresh clone still passes.
"""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MLOGRAPHY_SHARED", REPO_ROOT.parent / "shared"))
SCANS_DIR = SHARED_DIR / "data" / "tags_png_cropped"
TIF_DIR = SHARED_DIR / "data" / "tags_tif"
REFERENCE_DIR = SHARED_DIR / "reference"

#: Scans that the reference implementation was run on, at threshold 30.
REFERENCE_SCANS = ["scan1tag-47", "scan2tag-34", "scan3tag-48"]

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")


def _require(path):
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (set MLOGRAPHY_SHARED to its parent)")
    return path


@pytest.fixture
def scans_dir():
    """Folder of the 219 published scans; skips when absent."""
    return _require(SCANS_DIR)


@pytest.fixture
def tif_dir():
    """Folder of the raw 1-bit TIFF pages; skips when absent."""
    return _require(TIF_DIR)


@pytest.fixture
def reference_dir():
    """Folder of the reference implementation's values; skips when absent."""
    return _require(REFERENCE_DIR)
