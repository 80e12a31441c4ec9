"""Scheduling commands (issue 3: beat, schedule)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""
