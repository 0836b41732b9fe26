"""Dependency metadata as pip users expect it: every pyproject.toml in the repository declares
compatible ranges (never an exact `==` pin, which makes pylium impossible to install next to a
package that needs another patch release), and the one tested set, constraints.txt, pins every
declared dependency inside its range. Reads files only: no pip, no network."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ._helpers import REPO

CONSTRAINTS = REPO / "constraints.txt"


def pyprojects() -> list[Path]:
    found = [REPO / "pyproject.toml", *sorted(REPO.glob("plugins/*/pyproject.toml")),
             *sorted(REPO.glob("examples/*/pyproject.toml"))]
    return [p for p in found if p.is_file()]


def declared(path: Path) -> list[tuple[str, Requirement]]:
    """(where, requirement) for `dependencies` and every optional-dependency group."""
    project = tomllib.loads(path.read_text())["project"]
    out = [("dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt: {line!r} is not name==version"
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def test_every_project_file_is_checked():
    found = {str(p.relative_to(REPO)) for p in pyprojects()}
    assert {"pyproject.toml", "plugins/kvstore_etcd/pyproject.toml",
            "plugins/l7_http/pyproject.toml",
            "examples/pylium-kvstore-file/pyproject.toml"} <= found


@pytest.mark.parametrize("path", pyprojects(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_exact_pins_and_every_third_party_range_is_bounded(path):
    problems = []
    for where, req in declared(path):
        ops = {s.operator for s in req.specifier}
        if ops & {"==", "==="}:
            problems.append(f"{where}: {req} pins an exact version; declare a range")
        if where != "dependencies" and canonicalize_name(req.name).startswith("pylium"):
            continue  # the core's extras only name its plugins, which ship with it
        if not ops & {">=", "~="} or not ops & {"<", "~="}:
            problems.append(f"{where}: {req} needs a lower and an upper bound")
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_constraints_pin_every_declared_dependency_inside_its_range():
    pins = constraints()
    problems = []
    for path in pyprojects():
        for where, req in declared(path):
            name = canonicalize_name(req.name)
            if name.startswith("pylium"):
                continue  # installed from this checkout, never from the constraints
            if name not in pins:
                problems.append(f"{path.relative_to(REPO)} {where}: {req.name} is not pinned")
            elif pins[name] not in req.specifier:
                problems.append(f"{path.relative_to(REPO)} {where}: constraints.txt has "
                                f"{req.name}=={pins[name]}, outside {req.specifier}")
    assert not problems, "\n".join(problems)


def test_constraints_hold_no_pylium_distribution():
    """`pip install -c constraints.txt -e .` would refuse a pin on what it installs from here."""
    assert not [n for n in constraints() if n.startswith("pylium")]
