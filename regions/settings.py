"""Every GEOSCRAPE_* setting geoscrape reads from the environment, in one place.

`Settings` lists each variable with its type, default and a one-line doc; the
modules that need one call `settings()` and never read the environment for
it themselves. It lives in `regions`, the lowest layer, so every package may
import it. `settings()` builds the model from the current environment (cached
per distinct set of GEOSCRAPE_* values, so a test's monkeypatch or a child's
environment is always seen); an unusable value raises `SettingsError` with one
line naming the variable, which the CLI prints with exit code 2. An empty
variable counts as unset.

Names that are not fields, because part of the name is data:

    GEOSCRAPE_BROKER_PASSWORD_<REGION>   `broker provision`: that region's broker password
    GEOSCRAPE_CODE_TOKEN_<REGION>        `geoscrape api`: the token that region fetches code with
    ${VAR}, ${VAR:-default}              any variable, substituted into sites.yaml strings

<REGION> is the region's name upper-cased, `-` as `_` (`per_region_env`).
Two more are a worker's messages to its crawl child, not settings
(`INTERNAL`): GEOSCRAPE_CODE_PATH and GEOSCRAPE_EGRESS. docs/SETTINGS.md is
the table of `markdown_table()`; `python -m regions.settings` prints it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from regions.errors import SettingsError

ENV_PREFIX = "GEOSCRAPE_"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_DATABASE_URL = "sqlite:///geoscrape.db"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_REDIS_PREFIX = "geoscrape:"
# Heartbeats come about every second from the worker process itself (a timer,
# not the crawl), so a slow crawl on a busy machine still renews its lease; 10 s
# lets a killed worker's run be redelivered within about 15 s.
DEFAULT_RUN_LEASE = 10.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_FRONTIER_LEASE = 60.0  # tests use a few seconds

BROKER_PASSWORD_PREFIX = ENV_PREFIX + "BROKER_PASSWORD_"
CODE_TOKEN_PREFIX = ENV_PREFIX + "CODE_TOKEN_"
PREFIXES = {
    BROKER_PASSWORD_PREFIX: "`geoscrape broker provision`: the broker password of "
    "region <REGION>'s user (else generated for a new user)",
    CODE_TOKEN_PREFIX: "`geoscrape api`: the bearer token region <REGION>'s workers "
    "fetch deployed code with (their GEOSCRAPE_CODE_TOKEN)",
}
INTERNAL = {
    ENV_PREFIX + "CODE_PATH": "set by the worker for its crawl child: the unpacked code bundle",
    ENV_PREFIX + "EGRESS": "set by the worker for its crawl child: the run's egress exits",
}


def _must(phrase: str) -> JsonDict:
    # What a bad value is told it must be (the error names the variable and value).
    return {"must_be": phrase}


def _seconds(default: float, description: str) -> Any:
    return Field(
        default,
        gt=0,
        allow_inf_nan=False,
        description=description,
        json_schema_extra=_must("a number of seconds above 0"),
    )


class Settings(BaseSettings):
    """geoscrape's environment: each field is GEOSCRAPE_ + its name upper-cased."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    # Where things are
    config: Path | None = Field(
        None, description="The sites file (commands that need one default to `sites.yaml`)."
    )
    home: Path | None = Field(
        None,
        description="Where a relative SQLite path resolves (else the sites file's "
        "directory, else the current one).",
    )
    broker_url: str = Field(
        DEFAULT_BROKER_URL,
        description="RabbitMQ: `amqp://`, or `amqps://` with the three BROKER_ files below.",
    )
    broker_ca: Path | None = Field(
        None, description="amqps: the CA bundle that signed the broker's certificate."
    )
    broker_cert: Path | None = Field(
        None, description="amqps: the client certificate (PEM), when the broker asks for one."
    )
    broker_key: Path | None = Field(
        None, description="amqps: the client certificate's private key (PEM)."
    )
    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="The central store: `sqlite:///...` or `postgresql://...`.",
    )
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis of the beat, rate budgets and distributed frontiers.",
    )
    redis_prefix: str = Field(
        DEFAULT_REDIS_PREFIX, description="The prefix of every Redis key geoscrape writes."
    )

    # Ingest: leases and redelivery (docs/RELIABILITY.md)
    run_lease: float = _seconds(
        DEFAULT_RUN_LEASE, "Seconds without a heartbeat after which ingest redelivers a run."
    )
    max_attempts: int = Field(
        DEFAULT_MAX_ATTEMPTS,
        gt=0,
        description="Started attempts after which a run whose lease lapses is `dead`.",
        json_schema_extra=_must("a whole number above 0"),
    )

    # Workers
    frontier_lease: float = _seconds(
        DEFAULT_FRONTIER_LEASE,
        "Seconds a distributed run's worker holds a URL before others may take it.",
    )
    warm_children: bool = Field(
        True,
        description="Fork crawls from a warm process that pre-imported the crawl code.",
        json_schema_extra=_must("true or false (1/0, yes/no, on/off)"),
    )
    chromium: Path | None = Field(
        None, description="engine browser: the Chromium executable (else `chromium` on PATH)."
    )
    code_url: str | None = Field(
        None, description="Deployed code: the central API's base URL workers fetch bundles from."
    )
    code_token: SecretStr | None = Field(
        None, description="Deployed code: this region's token for the API's /code."
    )
    code_cache: Path | None = Field(
        None,
        description="Deployed code: the worker's bundle cache (else "
        "$XDG_CACHE_HOME/geoscrape/code).",
    )

    # The API and dashboard
    api_token: SecretStr | None = Field(
        None,
        description="`geoscrape api`: the bearer token all but /health, /code and the docs need.",
    )
    api_write_token: SecretStr | None = Field(
        None, description="`geoscrape api`: the token the dashboard's requeue button needs."
    )

    # Logging: the CLI's --log-level, --log-file and --log-format read these
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Log level (`--log-level`).",
        json_schema_extra=_must("one of debug, info, warning, error"),
    )
    log_file: Path | None = Field(None, description="Append logs to this file (`--log-file`).")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`text`, or `json`: one object per line (`--log-format`).",
        json_schema_extra=_must("text or json"),
    )


def env_name(field: str) -> str:
    """The environment variable of a `Settings` field."""
    if field not in Settings.model_fields:
        raise KeyError(field)
    return ENV_PREFIX + field.upper()


def variables() -> dict[str, FieldInfo]:
    """Every GEOSCRAPE_* variable of the model and its field, in declaration order."""
    return {env_name(name): info for name, info in Settings.model_fields.items()}


def per_region_env(prefix: str, region: str) -> str:
    """`prefix` + the region upper-cased, `-` as `_` (GEOSCRAPE_CODE_TOKEN_ASIA_EAST)."""
    return prefix + region.upper().replace("-", "_")


def per_region_value(prefix: str, region: str) -> str | None:
    """The value of `per_region_env(prefix, region)` now; None when unset or empty."""
    return os.environ.get(per_region_env(prefix, region)) or None


def settings() -> Settings:
    """The settings in the environment now; SettingsError names a bad variable."""
    return _build(
        tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)))
    )


@lru_cache(maxsize=16)
def _build(snapshot: tuple[tuple[str, str], ...]) -> Settings:
    # `snapshot` is the cache key only: building from os.environ keeps pydantic-
    # settings' own parsing. An exception is not cached, so a fix is seen at once.
    del snapshot
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        info = Settings.model_fields.get(field)
        extra = info.json_schema_extra if info is not None else None
        must = extra.get("must_be") if isinstance(extra, dict) else None
        why = f"must be {must}" if must else str(error["msg"]).lower()
        name = env_name(field) if info is not None else ENV_PREFIX + field.upper()
        problems.append(f"environment variable {name}={error['input']!r}: {why}")
    return "; ".join(problems)


_TYPE_NAMES = {
    Path: "path",
    str: "string",
    SecretStr: "secret",
    float: "number",
    int: "integer",
    bool: "boolean",
}


def _type_name(info: FieldInfo) -> str:
    kinds = [t for t in get_args(info.annotation) or (info.annotation,) if t is not type(None)]
    if get_origin(info.annotation) is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(info.annotation))
    return " \\| ".join(_TYPE_NAMES.get(kind, str(kind)) for kind in kinds)


def _default(info: FieldInfo) -> str:
    if info.default is None:
        return "unset"
    return f"`{str(info.default).lower() if isinstance(info.default, bool) else info.default}`"


def markdown_table() -> str:
    """docs/SETTINGS.md's table of every variable: name, type, default, meaning."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, info in variables().items():
        rows.append(f"| `{name}` | {_type_name(info)} | {_default(info)} | {info.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
