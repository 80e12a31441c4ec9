# One image for every geoscrape service: central (migrate, beat, ingest, api,
# flower) and regional workers. Each service runs a `geoscrape` subcommand.
# Any Python 3.11+ image with pip; deploy/offline/build.sh makes a local stand-in.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Regions with `engine: browser` sites need Chromium: build with --build-arg CHROMIUM=1.
ARG CHROMIUM=0
RUN if [ "$CHROMIUM" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends chromium \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY regions ./regions
COPY scheduler ./scheduler
COPY scraper ./scraper
COPY storage ./storage
COPY geoscrape ./geoscrape
COPY dashboard ./dashboard
RUN pip install ".[flower]"

# The default sites file; compose mounts the real one over it.
COPY examples/sites.yaml /etc/geoscrape/sites.yaml
ENV GEOSCRAPE_CONFIG=/etc/geoscrape/sites.yaml

RUN useradd --system --uid 10001 --home-dir /app geoscrape
USER geoscrape

ENTRYPOINT ["geoscrape"]
CMD ["--help"]
