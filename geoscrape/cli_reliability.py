"""Reliability commands (issue 6: dead-letter inspection and requeue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""
