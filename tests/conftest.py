"""Shared fixtures. Privileged tests (tests/privileged) need root, netns and BPF; they
create uniquely named namespaces and always remove them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the project expects ../shared beside the checkout")
    return SHARED


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="privileged test: needs root")
    for item in items:
        if "privileged" in item.nodeid.split(os.sep):
            item.add_marker(skip)
