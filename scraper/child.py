"""The crawl child: `python -m scraper.child` runs one Job and exits.

Reads one Job (JSON) on stdin, runs its site's engine and writes the events of
`scraper.protocol` to the protocol stream, ending with exactly one "done".

The protocol stream is the original stdout: at start the child duplicates fd 1
for the protocol and points fd 1 at stderr, so a print() in a user spider or a
library writing to stdout cannot corrupt it. Logs go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

from regions.messages import Job
from scraper.code import CODE_PATH_ENV
from scraper.egress import ChildEgress, Exits, from_env
from scraper.errors import ScraperError
from scraper.protocol import Recorder

log = logging.getLogger("scraper.child")


def protect_stdout() -> IO[str]:
    """Move the real stdout to a private fd; fd 1 (and sys.stdout) now go to stderr."""
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    os.set_inheritable(proto_fd, False)  # grandchildren must not hold the protocol open
    return os.fdopen(proto_fd, "w", encoding="utf-8", buffering=1)


def crash_summary(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ScraperError) else f"{type(exc).__name__}: {exc}"
    return text[:500]


def code_path(job: Job) -> str | None:
    """The unpacked bundle the worker fetched for a job that pins one (scraper.code)."""
    if job.code is None:
        return None
    path = os.environ.get(CODE_PATH_ENV)
    if not path:
        raise ScraperError(f"job pins code bundle {job.code.version} but the worker gave none")
    return path


def run_job(job: Job, recorder: Recorder, exits: Exits | None = None) -> None:
    """Run the job's engine and write the final "done" event.

    `exits`: the worker's verified egress (scraper.egress); a per-run crawl
    whose exit failed ends failed with the proxy error.
    """
    exits = exits or Exits(ChildEgress())
    try:
        site = job.config
        log.info("run %s: site %s, engine %s", job.run_id, site.name, site.engine)
        if site.engine == "requests" and site.spider is None:
            from scraper import requests_engine

            note = requests_engine.run(site, recorder, exits)
        elif site.engine == "browser":
            from scraper import browser_engine

            # Chromium is not routed through egress proxies yet: never let it go direct.
            if any(e.proxy for e in exits.exits):
                raise ScraperError(
                    "engine 'browser' cannot use egress proxies yet (docs/BROWSER.md)"
                )
            note = browser_engine.run(site, recorder)
        else:
            from scraper import scrapy_engine

            note = scrapy_engine.run(
                site, recorder, project=code_path(job), exits=exits, run_id=job.run_id
            )
        status, error = recorder.outcome(crash=exits.failure, note=note)
    except Exception as exc:
        log.exception("run %s crashed", job.run_id)
        status, error = recorder.outcome(crash=crash_summary(exc))
    recorder.done(status, error)
    log.info("run %s %s: %s", job.run_id, status, recorder.stats.snapshot().model_dump())


def main() -> int:
    proto = protect_stdout()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s [%(name)s] %(levelname)s: %(message)s",
    )
    recorder = Recorder(proto)
    try:
        job = Job.model_validate_json(sys.stdin.buffer.read())
    except Exception as exc:
        log.error("no valid job on stdin: %s", exc)
        recorder.done("failed", f"no valid job on stdin: {crash_summary(exc)}")
        return 2
    run_job(job, recorder, from_env())
    proto.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
