""".ci/aarch64-wheels' own logic, offline: which packages a Pi needs, and which sdists are pure Python.

The downloads themselves run in CI (.ci/run), against PyPI; docs/raspberry-pi.md shows a run.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheels() -> ModuleType:
    loader = SourceFileLoader("aarch64_wheels", str(ROOT / ".ci/aarch64-wheels"))  # a script without .py
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


def sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_an_extra_pulls_in_its_package_and_markers_are_judged_for_the_pi(wheels):
    found = wheels.closure(["psycopg[binary]>=3.1", "uvicorn"], transitive=True)
    assert "psycopg-binary" in found and found["psycopg-binary"][1] == "via psycopg"
    assert found["psycopg"][0].startswith("psycopg==") and found["psycopg"][1] == "pyproject.toml"
    assert "colorama" not in found  # click's Windows-only dependency
    assert set(wheels.closure(["psycopg[binary]>=3.1"], transitive=False)) == {"psycopg"}


def test_every_runtime_dependency_of_pyproject_is_checked(wheels):
    import tomllib

    direct = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = wheels.closure(direct, transitive=True)
    assert {"pydantic-core", "cryptography", "dbus-fast", "aiohttp", "sqlalchemy"} <= set(found)


def test_an_sdist_with_c_sources_or_extension_modules_is_not_pure(wheels, tmp_path):
    pure = sdist(tmp_path / "pure-1.0.tar.gz", {"pure-1.0/setup.py": "from setuptools import setup\nsetup()\n",
                                                 "pure-1.0/pure/__init__.py": ""})
    assert wheels.compiled_sources(pure) == []
    c = sdist(tmp_path / "fast-1.0.tar.gz", {"fast-1.0/setup.py": "setup(ext_modules=[Extension('f', ['f.c'])])",
                                              "fast-1.0/f.c": "int x;"})
    assert wheels.compiled_sources(c) == ["fast-1.0/f.c", "setup.py (ext_modules)"]
    rust = sdist(tmp_path / "oxide-1.0.tar.gz", {"oxide-1.0/Cargo.toml": "", "oxide-1.0/src/lib.rs": ""})
    assert wheels.compiled_sources(rust) == ["oxide-1.0/Cargo.toml", "oxide-1.0/src/lib.rs"]


def test_bookworms_glibc_manylinux_tags_are_accepted(wheels):
    assert wheels.PLATFORMS[0] == "manylinux2014_aarch64"
    assert "manylinux_2_28_aarch64" in wheels.PLATFORMS  # psycopg-binary ships only 2_27/2_28 aarch64 wheels
    assert "manylinux_2_36_aarch64" in wheels.PLATFORMS and "manylinux_2_37_aarch64" not in wheels.PLATFORMS
