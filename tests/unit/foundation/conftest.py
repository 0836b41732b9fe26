"""Fixtures for foundation tests."""

from __future__ import annotations

import sys

import pytest

from ._helpers import FakeSite


@pytest.fixture
def fake_site(tmp_path, monkeypatch) -> FakeSite:
    """A temp dir of fake installed plugin distributions, on sys.path for this test."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    site = FakeSite(root)
    yield site
    for module in site.modules:
        sys.modules.pop(module, None)
