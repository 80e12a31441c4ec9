"""Regions made of Linux network namespaces, for `geoscrape dev regions` (and tests).

One namespace per region, each with a veth pair to one Linux bridge on the
host and its own /24 (10.77.<n>.0/24: the namespace is .2, the bridge .1).
The bridge also holds a service address (10.77.<s>.1) where the geo-aware
site and a broker forwarder listen; each namespace has a route to that one
/24 and nothing else: no default route, no NAT, nothing leaves the machine,
and the namespaces cannot reach each other.

    net = create(["eu", "us"], tag="dev", persistent=True)
    net.hosts["eu"].address            # 10.77.<n>.2, eu's source address
    net.hosts["eu"].netns              # run a worker there: ip netns exec <netns> ...
    net.service_address                # listen here, on the host
    destroy(net)

Every network has a tag in its names and a state file in STATE_DIR naming its
owner process (none for `dev regions up`); `remove_stale()` deletes networks
whose owner died, so a killed test run leaves nothing behind for long (the
tests' own helpers are tests/namespaces.py). Needs root (CI runs as root);
without it, creating fails with a clear error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from regions.errors import RegionsError

STATE_DIR = Path("/run/geoscrape-netns")
BASE = "10.77"  # second octet fixed; the third picks a /24
TAG_RE = re.compile(r"^[a-z0-9]{2,8}$")


class NetnsError(RegionsError):
    """Region namespaces could not be created or removed."""


@dataclass(frozen=True)
class RegionHost:
    region: str
    netns: str
    address: str  # the region's source address, inside its namespace
    gateway: str  # the bridge's address in the region's subnet
    subnet: str


@dataclass
class RegionNet:
    tag: str
    bridge: str
    service_address: str
    service_subnet: str
    hosts: dict[str, RegionHost]
    owner_pid: int  # 0: persistent (`geoscrape dev regions up`), removed only by `down`
    links: list[str] = field(default_factory=list)  # host-side veth ends

    def subnets(self) -> dict[str, str]:
        return {region: host.subnet for region, host in self.hosts.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RegionNet:
        data = json.loads(text)
        data["hosts"] = {r: RegionHost(**h) for r, h in data["hosts"].items()}
        return cls(**data)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(
            f"ip {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def check_can_create() -> None:
    if shutil.which("ip") is None:
        raise NetnsError("the 'ip' command (iproute2) is missing: apt-get install iproute2")
    if os.geteuid() != 0:
        raise NetnsError(
            "creating network namespaces needs root (CI runs as root): run the region tests "
            "and 'geoscrape dev regions up' as root"
        )


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One creator/remover at a time on this machine (subnets are picked from what is free)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _state_file(tag: str) -> Path:
    return STATE_DIR / f"{tag}.json"


def _networks() -> list[RegionNet]:
    found = []
    for path in sorted(STATE_DIR.glob("*.json")):
        with contextlib.suppress(ValueError, TypeError, KeyError, OSError):
            found.append(RegionNet.from_json(path.read_text()))
    return found


def _used_octets(base: str = BASE) -> set[int]:
    used = set()
    shown = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    for match in re.finditer(rf"\b{re.escape(base)}\.(\d+)\.", shown):
        used.add(int(match.group(1)))
    for net in _networks():
        for subnet in [net.service_subnet, *net.subnets().values()]:
            if subnet.startswith(base + "."):
                used.add(int(subnet.split(".")[2]))
    return used


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pick_octets(tag: str, count: int, used: set[int], service: int | None = None) -> list[int]:
    """Third octets for the service /24 and `count` regions, stable for a tag.

    The service /24 is `service` (from --subnet) or derived from the tag (a
    hash), so a sites.yaml written against `dev regions up` keeps working
    after a restart; the regions take the next free octets after it. Only a
    collision with a /24 in use moves them (a given `service` in use is an error).
    """
    candidates = list(range(1, 255))
    if service is None:
        start = int(hashlib.sha256(tag.encode()).hexdigest(), 16) % len(candidates)
        ordered = candidates[start:] + candidates[:start]
    else:
        if service in used:
            raise NetnsError(f"subnet {BASE}.{service}.0/24 is in use on this machine")
        ordered = [c for c in candidates if c >= service] + [c for c in candidates if c < service]
    free = [c for c in ordered if c not in used]
    if len(free) < count + 1:
        raise NetnsError(f"not enough free /24s in {BASE}.0.0/16")
    return free[: count + 1]


def parse_subnet(subnet: str) -> int:
    """The third octet of a --subnet like 10.77.40.0/24; NetnsError otherwise."""
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise NetnsError(f"--subnet {subnet!r}: {exc}") from None
    if net.prefixlen != 24 or not str(net.network_address).startswith(f"{BASE}."):
        raise NetnsError(
            f"--subnet {subnet!r}: give a /24 inside {BASE}.0.0/16, e.g. {BASE}.40.0/24"
        )
    return int(str(net.network_address).split(".")[2])


def create(
    regions: Iterable[str],
    *,
    tag: str | None = None,
    persistent: bool = False,
    service_octet: int | None = None,
    base: str = BASE,
) -> RegionNet:
    """Create one namespace per region, a bridge and the service address
    (at stable addresses for a given tag: pick_octets).

    `base`: the first two octets of the /16 the /24s are picked from.
    """
    regions = list(regions)
    if not regions:
        raise NetnsError("no regions to create namespaces for")
    check_can_create()
    tag = tag or secrets.token_hex(3)
    if not TAG_RE.match(tag):
        raise NetnsError(f"tag {tag!r}: use 2-8 lowercase letters or digits")
    with _locked():
        _remove_stale_locked()
        if _state_file(tag).exists():
            raise NetnsError(f"region network {tag!r} exists: remove it first ('down')")
        octets = pick_octets(tag, len(regions), _used_octets(base), service_octet)
        service = octets[0]
        net = RegionNet(
            tag=tag,
            bridge=f"gs{tag}br",
            service_address=f"{base}.{service}.1",
            service_subnet=f"{base}.{service}.0/24",
            hosts={
                region: RegionHost(
                    region=region,
                    netns=f"gs{tag}-{region}",
                    address=f"{base}.{n}.2",
                    gateway=f"{base}.{n}.1",
                    subnet=f"{base}.{n}.0/24",
                )
                for region, n in zip(regions, octets[1:], strict=True)
            },
            owner_pid=0 if persistent else os.getpid(),
            links=[f"gs{tag}h{i}" for i in range(len(regions))],
        )
        # Recorded before anything exists, so a crash half-way is still cleaned up.
        _state_file(tag).write_text(net.to_json())
        try:
            _build(net)
        except BaseException:
            _destroy_locked(net)
            raise
    return net


def _build(net: RegionNet) -> None:
    _ip("link", "add", net.bridge, "type", "bridge")
    _ip("addr", "add", f"{net.service_address}/24", "dev", net.bridge)
    for host in net.hosts.values():
        _ip("addr", "add", f"{host.gateway}/24", "dev", net.bridge)
    _ip("link", "set", net.bridge, "up")
    for link, host in zip(net.links, net.hosts.values(), strict=True):
        inner = "eth0"
        _ip("netns", "add", host.netns)
        _ip("link", "add", link, "type", "veth", "peer", "name", inner, "netns", host.netns)
        _ip("link", "set", link, "master", net.bridge)
        _ip("link", "set", link, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", inner)
        _ip("-n", host.netns, "link", "set", inner, "up")
        # The only route out of the namespace: to the service /24, via the bridge.
        _ip("-n", host.netns, "route", "add", net.service_subnet, "via", host.gateway)


def _destroy_locked(net: RegionNet) -> None:
    errors = []
    for host in net.hosts.values():
        done = _ip("netns", "del", host.netns, check=False)  # takes its veth pair along
        if done.returncode != 0 and "No such file" not in done.stderr:
            errors.append(done.stderr.strip())
    for link in [*net.links, net.bridge]:
        done = _ip("link", "del", link, check=False)
        if done.returncode != 0 and "Cannot find device" not in done.stderr:
            errors.append(done.stderr.strip())
    _state_file(net.tag).unlink(missing_ok=True)
    if errors:
        raise NetnsError(f"removing region network {net.tag!r}: {'; '.join(errors)}")


def destroy(net: RegionNet) -> None:
    """Remove the namespaces, links and bridge of `net` (idempotent)."""
    with _locked():
        _destroy_locked(net)


def find(tag: str) -> RegionNet | None:
    path = _state_file(tag)
    return RegionNet.from_json(path.read_text()) if path.exists() else None


def _remove_stale_locked() -> list[str]:
    removed = []
    for net in _networks():
        if net.owner_pid and not _alive(net.owner_pid):
            _destroy_locked(net)
            removed.append(net.tag)
    return removed


def remove_stale() -> list[str]:
    """Remove networks whose creating process is gone; their tags."""
    if not STATE_DIR.exists():
        return []
    with _locked():
        return _remove_stale_locked()
