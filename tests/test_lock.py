"""The locks (requirements.lock for the image, requirements-dev.lock for `make test` and CI) name every
dependency pyproject.toml declares, at a version it allows, with the hashes pip checks; CI and the
image install from them. A dependency added to pyproject.toml without `make lock` fails here."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(\\?)$")


def read_lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) for every pinned package of a pip-compile lock."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current: str | None = None
    for line in (ROOT / name).read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            assert current not in pins, f"{name}: {current} pinned twice"
            pins[current] = (Version(match.group(2)), [])
            continue
        hashed = re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line)
        if hashed and current is not None:
            pins[current][1].append(hashed.group(1))
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"{name}: a line that is not a pin with hashes: {line!r}")
    return pins


def declared() -> tuple[list[Requirement], list[Requirement]]:
    """pyproject.toml's run-time requirements, and its extras' (the package's own name left out)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    return runtime, [r for r in extras if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def check(requirements: list[Requirement], pins: dict[str, tuple[Version, list[str]]], lock: str) -> None:
    problems = []
    for req in requirements:
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not in {lock}")
        elif not req.specifier.contains(pinned[0], prereleases=True):
            problems.append(f"{lock} pins {req.name}=={pinned[0]}, outside pyproject.toml's {req.specifier}")
    assert problems == [], "run `make lock` and commit both locks:\n" + "\n".join(problems)


def test_every_declared_dependency_is_locked_at_an_allowed_version():
    runtime, extras = declared()
    check(runtime, read_lock("requirements.lock"), "requirements.lock")
    check(runtime + extras, read_lock("requirements-dev.lock"), "requirements-dev.lock")


def test_every_pin_is_hashed_and_both_locks_agree():
    image, dev = read_lock("requirements.lock"), read_lock("requirements-dev.lock")
    for name, pins in (("requirements.lock", image), ("requirements-dev.lock", dev)):
        assert [p for p, (_, hashes) in pins.items() if not hashes] == [], f"{name}: pins without a hash"
    assert sorted(set(image) - set(dev)) == []
    assert {p: v for p, (v, _) in image.items() if dev[p][0] != v} == {}, "the image and the tests differ"
    assert "setuptools" in dev  # tracker's build backend: `pip install --no-build-isolation -e .` uses it


def test_ci_and_the_image_install_from_the_locks():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"\$\(PIP\) install .*--require-hashes -r \$\(LOCK\)", makefile)
    assert "LOCK := requirements-dev.lock" in makefile
    assert re.search(r"install .*--no-deps --no-build-isolation -e \.", makefile)
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"pip install .*--require-hashes -r \S*requirements\.lock", docker)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
