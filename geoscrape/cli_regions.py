"""Region and broker commands (issue 4: broker provision, status, dev regions)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `geoscrape` app."""
