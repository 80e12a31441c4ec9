"""A private Docker engine for the compose end-to-end test.

dockerd runs with its own socket, data, exec root and pidfile under a temporary
directory, so the machine's own engine (if any) and /var/run/docker.sock are
never touched, and with `iptables`, `ip-forward`, `ip-masq` off and `bridge:
none`, so it leaves the host's firewall, forwarding and the network-namespace
tests alone. Compose's own networks (user-defined bridges) still work.

`stop()` always leaves nothing behind: containers killed, the daemon stopped
(SIGKILL after a grace period), every mount under the directory (the `nsfs`
of the daemon's default network namespace, overlays) unmounted, the directory
removed. It is safe to call twice and after a failed start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

DAEMON_SETTINGS = {
    "iptables": False,
    "ip6tables": False,
    "ip-forward": False,
    "ip-masq": False,
    "bridge": "none",
}


class EngineError(Exception):
    """The private Docker engine could not be started."""


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (the order to unmount them)."""
    prefix = str(root)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


class DockerEngine:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.log_path = root / "dockerd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise EngineError(f"docker {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
        return done.stdout

    def start(self, deadline: float = 60) -> None:
        for tool in ("dockerd", "docker", "docker-compose", "mmdebstrap"):
            if shutil.which(tool) is None:
                raise EngineError(
                    f"{tool} not found: install docker.io, docker-compose and mmdebstrap "
                    "(scripts/apt-packages.txt; .ci/run installs them)"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "daemon.json"
        config.write_text(json.dumps(DAEMON_SETTINGS))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    "dockerd",
                    f"--config-file={config}",
                    f"--data-root={self.root / 'data'}",
                    f"--exec-root={self.root / 'exec'}",
                    f"--pidfile={self.root / 'docker.pid'}",
                    f"--host={self.host}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest reaches us, not the daemon
            )
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            if self._process.poll() is not None:
                raise EngineError(f"dockerd exited {self._process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.docker("info", check=False, timeout=30):
                return
            time.sleep(0.3)
        raise EngineError(f"dockerd not answering after {deadline:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, non-builtin networks and volumes still known to the engine."""
        networks = self.docker("network", "ls", "--format", "{{.Name}}").split()
        return {
            "containers": self.docker("ps", "-aq").split(),
            "networks": [n for n in networks if n not in ("host", "none", "bridge")],
            "volumes": self.docker("volume", "ls", "-q").split(),
        }

    def remove_everything(self) -> None:
        """Every container, volume, image and network (the engine is ours alone)."""
        if containers := self.docker("ps", "-aq", check=False).split():
            self.docker("rm", "-f", "-v", *containers, check=False, timeout=300)
        self.docker("system", "prune", "--all", "--volumes", "--force", check=False, timeout=300)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        # containerd and its shims run under the daemon's session: end stragglers.
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for point in mounts_under(self.root):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
