"""A test-only spider that kills its worker while a flag file exists (a poison job).

With GEOSCRAPE_WARM_CHILDREN=0 the crawl process's parent is the `geoscrape
worker` itself (not the warm fork server), so SIGKILL to it
takes the worker down (and, by PR_SET_PDEATHSIG, this process with it): every
delivery of the job kills whichever worker runs it. Removing the flag file is
the "fix"; the spider then fetches one page and yields one item.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.http import Response

FLAG_ENV = "GEOSCRAPE_TEST_POISON_FLAG"  # path of the flag file
URL_ENV = "GEOSCRAPE_TEST_POISON_URL"  # the page to fetch once fixed


class KillWorkerSpider(scrapy.Spider):
    name = "poison"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        flag = os.environ.get(FLAG_ENV, "")
        if flag and os.path.exists(flag):
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # PR_SET_PDEATHSIG ends this process right away
        self.start_urls = [os.environ[URL_ENV]]

    def parse(self, response: Response, **_: Any) -> Iterator[dict[str, Any]]:
        yield {"sku": "fixed", "title": response.css("title::text").get()}
