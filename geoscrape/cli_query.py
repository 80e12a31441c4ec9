"""Query commands over the store (issue 5: compare, access, history, changes, api, export)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""
