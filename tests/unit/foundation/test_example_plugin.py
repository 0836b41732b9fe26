"""The third-party example's backend passes the same KV-store conformance suite as the
built-in one: what a plugin author runs against their own store (see
`pylium.kvstore.conformance`). Installation and discovery are in test_packaging.py."""

from __future__ import annotations

import sys

import pytest
from pylium.kvstore.conformance import KVStoreConformance

from ._helpers import REPO

sys.path.insert(0, str(REPO / "examples" / "pylium-kvstore-file"))
from pylium_kvstore_file.store import FileKVStore  # noqa: E402


class TestFileKVStoreConformance(KVStoreConformance):
    persistent = True
    watch_history = True

    @pytest.fixture
    def store_factory(self, tmp_path):
        return lambda: FileKVStore({"path": str(tmp_path / "state.json")}, tmp_path)
