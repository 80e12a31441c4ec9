"""Region namespaces for tests (root only): built by geoscrape/netns.py, owned by the test.

    with region_network(["eu", "us"]) as net:      # fails the test with the reason
        subprocess.Popen(in_namespace(net.hosts["eu"], "geoscrape", "worker", ...))

The network is owned by this process: removed when the block ends, and by the
next `remove_stale()` (run first here, and by `geoscrape dev regions down`) if
the test run is killed instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import pytest

from geoscrape import netns
from geoscrape.netns import RegionHost, RegionNet


def in_namespace(host: RegionHost, *command: str) -> list[str]:
    """argv that runs `command` inside `host`'s namespace."""
    return ["ip", "netns", "exec", host.netns, *command]


@contextlib.contextmanager
def region_network(
    regions: Iterable[str], *, tag: str | None = None, base: str = netns.BASE
) -> Iterator[RegionNet]:
    """A region network for the duration of the block, removed on any exit.

    Without root (or iproute2) the test fails with the reason: it never skips.
    """
    try:
        netns.remove_stale()
        net = netns.create(regions, tag=tag, base=base)
    except netns.NetnsError as exc:
        pytest.fail(f"cannot create the region namespaces: {exc}")
    try:
        yield net
    finally:
        netns.destroy(net)
