"""geoscrape: the `geoscrape` CLI, the demo and development tooling."""

__version__ = "0.1.0"
