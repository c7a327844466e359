"""Shared setup for the CelebA example tests.

The example is a script directory, not a package, so its modules are imported
the way ``python examples/celeba/run.py`` sees them: flat, with that directory on
the path (pytest's ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from demo_data import generate_demo_celeba


@pytest.fixture(autouse=True)
def _private_cache_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs without --cache-dir default to $XDG_CACHE_HOME/dstmtl: keep them out of the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset in the official layout, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("demo_celeba")
    generate_demo_celeba(root, n_images=120, seed=0)
    return root


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo dataset, for the tests that break or change its files."""
    root = tmp_path / "celeba"
    shutil.copytree(demo_root, root)
    return root
