"""The tests mirror the package: the tests of ``tiercache/x/y.py`` are ``tests/x/test_y.py``
(more files for one module are ``tests/x/test_y_<what>.py``, e.g. ``test_cuda_gpu.py``), and
every module has them. Cost (gpu, slow, service, vllm) is a marker, not a folder; the only
folders that mirror nothing are the ones below."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tiercache"
TESTS = ROOT / "tests"

# Folders of tests/ that mirror no package folder.
NOT_MIRRORS = {
    "fixtures": "data files the tests read",
    "scenarios": "the whole product across modules: security, fuzzing, a full disk, two daemons",
    "services": "the real services (Mosquitto, Prometheus, SeaweedFS) the tests start",
}


def modules() -> list[str]:
    """Every module of the package, relative to it (``daemon/`` and ``kernels/`` are reached
    through their links, so each file counts once, as the module it is installed as)."""
    found = []
    for d, _, files in os.walk(PACKAGE, followlinks=True):
        for f in files:
            if f.endswith(".py") and f != "__init__.py":
                found.append((Path(d) / f).relative_to(PACKAGE).as_posix())
    return sorted(found)


def expected_test_file(module: str) -> Path:
    path = Path(module)
    return TESTS / path.parent / f"test_{path.name}"


def test_the_package_is_found_with_its_linked_folders() -> None:
    found = modules()
    assert "manager.py" in found
    assert "daemon/server.py" in found
    assert "kernels/cuda.py" in found
    assert "tiers/disk.py" in found


@pytest.mark.parametrize("module", modules())
def test_every_module_has_a_test_file_named_after_it(module: str) -> None:
    want = expected_test_file(module)
    assert want.is_file(), f"tiercache/{module} has no tests: write {want.relative_to(ROOT)}"


def test_every_test_file_is_named_after_a_module_of_its_folder() -> None:
    by_folder: dict[str, set[str]] = {}
    for m in modules():
        path = Path(m)
        by_folder.setdefault(path.parent.as_posix(), set()).add(path.stem)
    stray = []
    for f in TESTS.rglob("test_*.py"):
        rel = f.relative_to(TESTS)
        if rel.parts[0] in NOT_MIRRORS or rel == Path("test_layout.py"):
            continue
        stem = f.stem.removeprefix("test_")
        names = by_folder.get(rel.parent.as_posix(), set())
        if not any(stem == n or stem.startswith(n + "_") for n in names):
            stray.append(rel.as_posix())
    assert not stray, (
        f"test files that mirror no module (rename, or move to tests/scenarios): {stray}"
    )


def test_every_folder_of_the_tests_mirrors_a_package_folder() -> None:
    for d in TESTS.iterdir():
        if d.is_dir() and d.name != "__pycache__" and d.name not in NOT_MIRRORS:
            assert (PACKAGE / d.name).is_dir(), f"tests/{d.name} mirrors nothing"


@pytest.mark.parametrize("folder", ["daemon", "kernels"])
def test_a_top_level_folder_does_not_shadow_the_pypi_package_of_its_name(
    folder: str, tmp_path: Path
) -> None:
    # daemon/ and kernels/ sit at the top of the checkout, which pytest and ``python -m`` put
    # first on sys.path; with an __init__.py each was a regular package that hid PyPI's
    # ``kernels`` (transformers imports it from 5.2x on) and ``daemon`` (python-daemon). As
    # namespace folders they give way to an installed package of the name.
    site = tmp_path / "site"
    (site / folder).mkdir(parents=True)
    (site / folder / "__init__.py").write_text("FROM_PYPI = True\n")
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}]; "
        f"import {folder}; print({folder}.FROM_PYPI)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr
    assert __import__(f"tiercache.{folder}", fromlist=["x"]).__path__  # still tiercache's


# The size limits that keep each concept in a room of its own (issue 14): a class past them
# has become a hub again.
MAX_CLASS_LINES = 500
MAX_MANAGER_LINES = 600


def test_no_class_is_longer_than_the_limit() -> None:
    long = []
    for module in modules():
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long.append(f"{module}: {node.name} ({lines} lines)")
    assert not long, f"classes longer than {MAX_CLASS_LINES} lines: {long}"


def test_the_manager_module_stays_a_facade() -> None:
    lines = len((PACKAGE / "manager.py").read_text().splitlines())
    assert lines < MAX_MANAGER_LINES, f"tiercache/manager.py has {lines} lines"
