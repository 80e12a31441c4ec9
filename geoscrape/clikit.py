"""What every `geoscrape` command module shares: consoles, options, the store."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# Piped output (CI logs, `| less`) gets wide tables instead of rich's 80 columns.
_PIPE_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=_PIPE_WIDTH)

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        envvar="GEOSCRAPE_CONFIG",
        help="The sites file (env GEOSCRAPE_CONFIG).",
    ),
]
DEFAULT_CONFIG = Path("sites.yaml")


def database_url() -> str:
    from storage.db import database_url

    return database_url()


def sessions() -> Any:
    """Sessions on the existing store (schema brought up to date), errors mapped
    to StorageError naming the store (storage.boundary)."""
    from storage.boundary import open_store

    return open_store(database_url())
