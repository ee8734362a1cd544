"""Fixtures shared by the tests (plain helpers live in ``helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARED  # noqa: E402


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared folder is expected at {SHARED} (tests read data and fixtures from it)")
    return SHARED
