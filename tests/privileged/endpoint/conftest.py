"""Fixtures: a fresh lab per test, always taken down."""

from __future__ import annotations

import pytest

from .eplab import make_lab  # noqa: E402


@pytest.fixture
def fresh_lab():
    lab = make_lab()
    try:
        yield lab
    finally:
        lab.down()
