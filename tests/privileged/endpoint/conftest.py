"""Fixtures: a fresh lab per test, always taken down."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from eplab import make_lab  # noqa: E402


@pytest.fixture
def fresh_lab():
    lab = make_lab()
    try:
        yield lab
    finally:
        lab.down()
