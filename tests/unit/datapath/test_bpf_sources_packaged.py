"""The BPF sources ship inside the `pylium` package (symlink + package-data), so an installed
pylium compiles the same programs as the checkout."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pylium.datapath.compile import bpf_source_dir

REPO = Path(__file__).resolve().parents[3]


def test_package_symlink_points_at_the_top_level_bpf_dir():
    link = REPO / "core" / "pylium" / "bpf"
    assert link.is_symlink() and link.resolve() == (REPO / "bpf").resolve()
    assert bpf_source_dir() == (REPO / "bpf").resolve()


def test_package_data_globs_cover_every_bpf_source():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pylium"]
    package = REPO / "core" / "pylium"
    shipped = {p.relative_to(package).as_posix() for g in globs for p in package.glob(g)}
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "bpf").rglob("*")
               if p.suffix in (".c", ".h")}
    assert sources and not sources - shipped, f"not shipped in the wheel: {sources - shipped}"
