"""The worker's cache of deployed code bundles: fetched once, verified, kept.

A job of a `project: deployed:NAME` site pins a bundle by its sha256
(`Job.code`). Before starting the crawl child, the worker asks this cache for
the bundle's directory; a bundle it lacks is downloaded from the central API
(`GET {GEOSCRAPE_CODE_URL}/code/{sha256}`, with the region's token), its
sha256 checked against the pin, then unpacked under GEOSCRAPE_CODE_CACHE. A
bundle whose hash does not match is refused: nothing of it is kept or run.
The crawl child gets the directory in GEOSCRAPE_CODE_PATH.

Cache layout: `<cache>/<sha256>/` holds the unpacked project; it appears by
an atomic rename once complete, so a crash never leaves a half bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import requests

from regions.messages import CodeRef
from regions.settings import env_name, settings
from scraper.bundle import MAX_BUNDLE_BYTES, BundleError, sha256_hex, unpack_bundle
from scraper.errors import ScraperError

CODE_URL_ENV = env_name("code_url")
CODE_TOKEN_ENV = env_name("code_token")  # the crawl child's environment goes without it
CODE_PATH_ENV = "GEOSCRAPE_CODE_PATH"  # parent -> crawl child: the unpacked bundle
REGION_HEADER = "X-Geoscrape-Region"
FETCH_TIMEOUT = 60.0


class CodeError(ScraperError):
    """A pinned bundle that cannot be had: unreachable, unknown, or not what was pinned."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "geoscrape" / "code"


class CodeCache:
    """Bundles of one region's worker, by sha256. Thread-safe (one crawl per pool thread)."""

    def __init__(self, directory: Path, url: str | None, token: str | None, region: str) -> None:
        self.directory = directory
        self.url = url.rstrip("/") if url else None
        self.token = token
        self.region = region
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, region: str) -> CodeCache:
        env = settings()
        return cls(
            env.code_cache or default_cache_dir(),
            env.code_url,
            env.code_token.get_secret_value() if env.code_token else None,
            region,
        )

    def path(self, ref: CodeRef) -> Path:
        """The unpacked bundle `ref` pins, fetching and verifying it if absent."""
        target = self.directory / ref.sha256
        if target.is_dir():
            return target
        with self._lock:
            if target.is_dir():
                return target
            data = self._download(ref)
            digest = sha256_hex(data)
            if digest != ref.sha256:
                raise CodeError(
                    f"code bundle {ref.version} refused: its sha256 is {digest}, "
                    f"the job pins {ref.sha256} (tampered or corrupted; nothing was run)"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=self.directory))
            try:
                unpack_bundle(data, staging / "project")
                os.rename(staging / "project", target)
            except OSError as exc:
                if not target.is_dir():  # else another worker on this cache won the race
                    raise CodeError(f"code bundle {ref.version}: {exc}") from exc
            except BundleError as exc:
                raise CodeError(f"code bundle {ref.version}: {exc}") from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return target

    def _download(self, ref: CodeRef) -> bytes:
        if self.url is None:
            raise CodeError(
                f"run needs code bundle {ref.version} but {CODE_URL_ENV} is not set on this worker"
            )
        headers = {REGION_HEADER: self.region}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = f"{self.url}/code/{ref.sha256}"
        try:
            with requests.get(url, headers=headers, timeout=FETCH_TIMEOUT, stream=True) as resp:
                if resp.status_code != 200:
                    raise CodeError(
                        f"code bundle {ref.version}: {url} answered {resp.status_code} "
                        f"{resp.text[:200].strip()}"
                    )
                body = bytearray()
                for chunk in resp.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_BUNDLE_BYTES:
                        raise CodeError(f"code bundle {ref.version}: over {MAX_BUNDLE_BYTES} bytes")
                return bytes(body)
        except requests.RequestException as exc:
            raise CodeError(f"code bundle {ref.version}: cannot fetch {url}: {exc}") from exc
