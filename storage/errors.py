"""Exceptions of the storage package; StorageError is the root."""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error raised by the storage package."""


class UnsupportedDatabaseError(StorageError):
    """The database URL names a backend geoscrape does not support (SQLite, PostgreSQL only)."""


class SchemaError(StorageError):
    """The database schema cannot be brought to this version of geoscrape.

    Typically the database was migrated by a newer geoscrape (its revision is
    unknown here), or a migration failed.
    """


class QueryError(StorageError):
    """A query the store cannot answer as asked: a bad filter or value (HTTP 400)."""


class NotFoundError(QueryError):
    """The site, key or tick asked about is not in the store (HTTP 404)."""
