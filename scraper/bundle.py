"""Code bundles: a Scrapy project directory as one zip, named by its sha256.

`make_bundle` (central, `geoscrape deploy`) is deterministic: the same files
give the same bytes (sorted entries, fixed timestamps, no caches), so the
same project deployed twice is the same version. `unpack_bundle` (worker)
refuses entries that would land outside the target directory. Neither imports
Scrapy.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import re
import zipfile
from pathlib import Path, PurePosixPath

from regions.site import NAME_PATTERN
from scraper.errors import ScraperError

SCRAPY_CFG = "scrapy.cfg"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # a project's code, not its data
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".venv", ".tox", ".mypy_cache", ".scrapy"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp, for reproducible bytes


class BundleError(ScraperError):
    """A project that cannot be bundled, or a bundle that cannot be unpacked."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def project_name(directory: Path) -> str:
    """The bundle name of a project: scrapy.cfg's [deploy] project, else the directory's."""
    cfg = directory / SCRAPY_CFG
    if not cfg.is_file():
        raise BundleError(f"{directory}: not a Scrapy project (no {SCRAPY_CFG})")
    parser = configparser.ConfigParser()
    try:
        parser.read(cfg, encoding="utf-8")
    except configparser.Error as exc:
        raise BundleError(f"{cfg}: {exc}") from None
    if not parser.get("settings", "default", fallback="").strip():
        raise BundleError(f"{cfg}: no 'default' settings module under [settings]")
    name = parser.get("deploy", "project", fallback="") or directory.resolve().name
    return name.strip().lower().replace(".", "-")


def check_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise BundleError(f"bundle name {name!r} must match {NAME_PATTERN}")
    return name


def make_bundle(directory: Path) -> bytes:
    """The project directory (with its scrapy.cfg at the root) as zip bytes."""
    project_name(directory)  # it must be a project
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and not any(part in _SKIP_DIRS for part in path.relative_to(directory).parts)
        and not path.name.endswith(_SKIP_SUFFIXES)
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(directory).as_posix(), _EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{directory}: bundle of {len(data)} bytes is over {MAX_BUNDLE_BYTES}")
    return data


def unpack_bundle(data: bytes, target: Path) -> None:
    """Extract a bundle into `target` (created); every entry must stay inside it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            total = 0
            for info in archive.infolist():
                parts = PurePosixPath(info.filename).parts
                if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
                    raise BundleError(f"bundle entry {info.filename!r} leaves its directory")
                total += info.file_size
                if total > MAX_BUNDLE_BYTES * 4:
                    raise BundleError("bundle unpacks to too many bytes")
            target.mkdir(parents=True)
            archive.extractall(target)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"cannot unpack bundle: {exc}") from exc
