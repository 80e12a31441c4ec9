"""Every SQL statement lives in storage/: the fronts only call it and render.

Outside storage/ a module may name a session's type (sqlalchemy.orm Session,
sessionmaker), catch sqlalchemy.exc errors and redact a URL (make_url); it
may not import anything that builds SQL (select, text, func...) nor the ORM
models (storage.models), which would let it query directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONTS = ["geoscrape", "dashboard", "scheduler", "regions", "scraper"]
ALLOWED = {
    "sqlalchemy.orm": {"Session", "sessionmaker"},
    "sqlalchemy.exc": None,  # any error class
    "sqlalchemy.engine": {"make_url"},
}


def sql_imports(source: str) -> list[str]:
    """`module:name` of each import in `source` that could build SQL or query the store."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                a.name
                for a in node.names
                if a.name.split(".")[0] == "sqlalchemy" or a.name.startswith("storage.models")
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if module == "storage" and any(a.name == "models" for a in node.names):
                found.append("storage:models")
            elif module.startswith("storage.models"):
                found += [f"{module}:{a.name}" for a in node.names]
            elif module.split(".")[0] == "sqlalchemy":
                allowed = ALLOWED.get(module, set())
                found += [
                    f"{module}:{a.name}"
                    for a in node.names
                    if allowed is not None and a.name not in allowed
                ]
    return found


@pytest.mark.parametrize("package", FRONTS)
def test_no_front_builds_sql(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / package).rglob("*.py"))
        if (found := sql_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"SQL outside storage/ (move it behind a storage function): {offenders}"


def test_the_check_catches_sql_imports() -> None:
    source = """
from sqlalchemy import select, func
from sqlalchemy.orm import Session, aliased
from sqlalchemy.exc import OperationalError
from sqlalchemy.engine import make_url, create_engine
import sqlalchemy as sa
from storage.models import Run
from storage import models, queries
def f():
    from sqlalchemy.sql import text
"""
    assert sorted(sql_imports(source)) == [
        "sqlalchemy",
        "sqlalchemy.engine:create_engine",
        "sqlalchemy.orm:aliased",
        "sqlalchemy.sql:text",
        "sqlalchemy:func",
        "sqlalchemy:select",
        "storage.models:Run",
        "storage:models",
    ]
