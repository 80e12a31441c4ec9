"""Exceptions of the scheduler package; SchedulerError is the root."""

from __future__ import annotations


class SchedulerError(Exception):
    """Root of every error raised by the scheduler package."""
