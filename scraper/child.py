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
from scheduler.config import ResolvedSite
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


def run_job(job: Job, recorder: Recorder) -> None:
    """Run the job's engine and write the final "done" event."""
    try:
        site = ResolvedSite.model_validate(job.config)
        log.info("run %s: site %s, engine %s", job.run_id, site.name, site.engine)
        if site.engine == "requests" and site.spider is None:
            from scraper import requests_engine as engine
        else:
            from scraper import scrapy_engine as engine  # type: ignore[no-redef]
        if site.distributed:  # one run over several workers (scraper/frontier.py)
            from scraper import scrapy_engine

            note = scrapy_engine.run(site, recorder, run_id=job.run_id)
        else:
            note = engine.run(site, recorder)
        status, error = recorder.outcome(note=note)
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
    run_job(job, recorder)
    proto.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
