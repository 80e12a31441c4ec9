"""Hot reload of sites.yaml: poll the file, keep the last good config.

Polling (size, mtime and a hash of the content) works the same whatever the
editor does (in-place write, rename over, a ConfigMap symlink swap) and costs
one stat per interval; the content hash catches edits within one mtime tick.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from scheduler.config import Config
from scheduler.loader import ConfigError, load_config

log = logging.getLogger("geoscrape.beat")


class ConfigWatcher:
    """The config in force: loaded at start (errors raise), then re-read on change."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._digest = self._read_digest()
        self.config: Config = load_config(self.path)  # a bad file at start is fatal
        self.generation = 0  # bumped on every change that took effect

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def poll(self) -> bool:
        """Re-read the file if it changed; True if a new config took effect.

        An invalid edit is logged, problem by problem as FILE:LINE, and the last
        good config stays in force until the file is fixed.
        """
        digest = self._read_digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            log.error(
                "config %s is invalid; keeping the last good one (%d site(s)):",
                self.path,
                len(self.config.sites),
            )
            for problem in exc.problems:
                log.error("  %s", problem)
            return False
        self.config = config
        self.generation += 1
        log.info("config %s reloaded: %d site(s)", self.path, len(config.sites))
        return True
