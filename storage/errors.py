"""Exceptions of the storage package; StorageError is the root."""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error raised by the storage package."""
