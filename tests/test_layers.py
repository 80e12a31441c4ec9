"""The import contract (pyproject.toml [tool.importlinter]) holds, and can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["geoscrape", "dashboard", "scheduler", "storage", "scraper", "regions"]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layers_hold_on_this_tree() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    messages = tmp_path / "regions" / "messages.py"
    messages.write_text(messages.read_text() + "\nimport storage.models  # an upward import\n")
    done = _lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 kept, 1 broken" in done.stdout, done.stdout
    assert "regions.messages -> storage.models" in done.stdout, done.stdout


# Imports every module, then builds every pydantic model it defines: a model
# used before its definition (a forward reference) fails only when first
# validated, and mypy does not see it. Printed: one line per incomplete model.
_BUILD_EVERY_MODEL = """
import importlib, inspect, pkgutil, sys
from pydantic import BaseModel
bad = []
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == info.name:
                try:
                    obj.model_rebuild(raise_errors=True)
                except Exception as exc:
                    bad.append(f"{info.name}.{name}: {exc}")
print("\\n".join(bad))
"""


def test_every_module_imports_and_every_model_is_complete() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_EVERY_MODEL, *PACKAGES],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout


def test_the_cli_starts_without_the_store_or_the_bus() -> None:
    """Every process a user or a test starts pays for what `geoscrape.cli` imports:
    the store's and the bus's libraries load in the commands that use them."""
    probe = (
        "import sys, geoscrape.cli; heavy = ('sqlalchemy', 'kombu', 'celery', 'scrapy'); "
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "", f"imported at start: {done.stdout.strip()}"
