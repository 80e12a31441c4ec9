"""Load sites.yaml into a `Config`, reporting every problem as FILE:LINE.

PyYAML's `safe_load` forgets where values came from, so we compose the YAML
into nodes (which carry positions) and build the plain data ourselves,
recording the line of every path on the way. Pydantic reports errors by path
(`loc`), which that map turns back into lines. Building the data ourselves also
lets us reject duplicate keys (PyYAML silently keeps the last one) and
substitute `${VAR}` from the environment with a line for each missing variable.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from scheduler.config import DUPLICATE_SITE_ERROR, Config
from scheduler.errors import SchedulerError

Loc = tuple[str | int, ...]  # a path into the data, as pydantic's error `loc`

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Bounds on what a sites file may cost to read: a "billion laughs" file (aliases
# of aliases) is a few hundred bytes that expand to billions of values, and deep
# nesting overflows PyYAML's recursive composer. Real configs are far below these.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_NESTING = 64
MAX_VALUES = 100_000  # values built, counting every expansion of an alias

# `$${` is a literal `${`; any other `${` that is not a well-formed reference is an error.
_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None  # 1-based; None only when no line applies (unreadable or empty file)
    site: str | None  # the site's name, "#<index>" if it has none; None outside sites
    field: str  # relative to the site inside one, absolute otherwise; "" for the whole file
    message: str

    def __str__(self) -> str:
        parts = [self.file if self.line is None else f"{self.file}:{self.line}"]
        if self.site is not None:
            parts.append(f"site {self.site!r}")
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(SchedulerError):
    """A config file that cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a sites file; `${VAR}` comes from `env` (default: os.environ)."""
    filename = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        message = f"cannot read the config file: {reason}"
        raise ConfigError([_file_problem(filename, message)]) from exc
    return parse_config(text, filename, env)


def parse_config(
    text: str, filename: str = "<string>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate config text; raise ConfigError with every problem found."""
    if len(text) > MAX_CONFIG_BYTES:
        message = f"the config is {len(text):,} characters; the limit is {MAX_CONFIG_BYTES:,}"
        raise ConfigError([_file_problem(filename, message)])
    root = _compose(text, filename)
    builder = _Builder(os.environ if env is None else env)
    try:
        data = builder.build(root, (), _line(root))
    except _TooLarge as exc:
        raise ConfigError([_file_problem(filename, exc.message, exc.line)]) from None

    issues = builder.issues
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        issues += _model_issues(exc, builder)
    if issues or config is None:
        problems = [_to_problem(filename, data, issue) for issue in issues]
        raise ConfigError(sorted(problems, key=lambda p: (p.line is None, p.line or 0)))
    return config


# --- YAML to data ---------------------------------------------------------------


@dataclass(frozen=True)
class _Issue:
    """A problem before it is phrased for the user: where in the data, which line."""

    loc: Loc
    line: int | None
    message: str


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _file_problem(filename: str, message: str, line: int | None = None) -> ConfigProblem:
    return ConfigProblem(file=filename, line=line, site=None, field="", message=message)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_NESTING."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                problem = f"nested deeper than {MAX_NESTING} levels"
                raise yaml.composer.ComposerError(None, None, problem, mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, filename: str) -> MappingNode:
    """The document's root node, which must be a mapping; syntax errors end here."""
    try:
        root = yaml.compose(text, Loader=_BoundedLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(filename, exc)]) from None
    except yaml.reader.ReaderError as exc:  # a control character: no mark, but a position
        line = text.count("\n", 0, exc.position) + 1
        message = (
            f"unacceptable character #x{exc.character:04x} (control characters are not allowed)"
        )
        raise ConfigError([_file_problem(filename, message, line)]) from None
    except yaml.YAMLError as exc:  # no mark to report
        problem = ConfigProblem(file=filename, line=None, site=None, field="yaml", message=str(exc))
        raise ConfigError([problem]) from None
    expected = "expected a mapping with 'regions' and 'sites'"
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL_TAG):
        raise ConfigError([_file_problem(filename, f"the config is empty; {expected}")])
    if not isinstance(root, MappingNode):
        kind = "a list" if isinstance(root, SequenceNode) else "a single value"
        message = f"the top level is {kind}; {expected}"
        raise ConfigError([_file_problem(filename, message, _line(root))])
    return root


def _syntax_problem(filename: str, exc: yaml.MarkedYAMLError) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    message = exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:  # PyYAML's order: "while parsing X (where), problem"
        context_line = exc.context_mark.line + 1 if exc.context_mark else None
        where = f" at line {context_line}" if context_line not in (None, line) else ""
        message = f"{exc.context}{where}, {exc.problem}"
    return ConfigProblem(file=filename, line=line, site=None, field="yaml", message=message)


class _TooLarge(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _Builder:
    """Plain Python data from YAML nodes, plus the line of every path and the problems.

    A path's line is the line of its key in a mapping, or of the item in a list.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.issues: list[_Issue] = []
        # Paths whose value could not be built: pydantic's complaints about the
        # placeholder there would only repeat the problem already reported.
        self.broken: set[Loc] = set()
        self._scalars = yaml.constructor.SafeConstructor()
        self._building: set[int] = set()  # collections in progress, to stop recursive aliases
        self._values = 0  # values built so far, to stop alias bombs (MAX_VALUES)

    def build(self, node: Node, loc: Loc, line: int) -> Any:
        self._values += 1
        if self._values > MAX_VALUES:  # stop at once: the rest would only cost more
            message = f"the document expands to more than {MAX_VALUES:,} values (aliases?)"
            raise _TooLarge(_line(node), message)
        self.lines[loc] = line
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        if id(node) in self._building:
            self._fail(loc, _line(node), "an alias refers to its own parent (recursion)")
            return None
        expected = _MAP_TAG if isinstance(node, MappingNode) else _SEQ_TAG
        if node.tag != expected:
            self._fail(loc, _line(node), f"unsupported YAML tag {node.tag!r}")
            return None
        self._building.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, loc)
            return [self.build(item, (*loc, i), _line(item)) for i, item in enumerate(node.value)]
        finally:
            self._building.discard(id(node))

    def _fail(self, loc: Loc, line: int, message: str) -> None:
        self.issues.append(_Issue(loc, line, message))
        self.broken.add(loc)

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        try:
            value = self._scalars.construct_object(node)
        except yaml.MarkedYAMLError as exc:  # e.g. an unknown tag such as `!env`
            self._fail(loc, _line(node), exc.problem or str(exc))
            return None
        if isinstance(value, str) and "${" in value:
            return self._substitute(value, loc, _line(node))
        return value

    def _substitute(self, text: str, loc: Loc, line: int) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if match.group(0) == "$${":
                return "${"
            if name is None:
                self._fail(loc, line, "malformed '${': write ${NAME} or ${NAME:-default}")
            elif name in self.env:
                return self.env[name]
            elif default is not None:
                return default
            else:
                message = (
                    f"environment variable {name!r} is not set (and ${{{name}}} has no default)"
                )
                self._fail(loc, line, message)
            return match.group(0)

        return _VARIABLE.sub(replace, text)

    def _mapping(self, node: MappingNode, loc: Loc) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # merged in below: explicit keys win over merged ones
            key = self._key(key_node, loc)
            if key is None:
                continue
            line = _line(key_node)
            if key in first_seen:
                message = f"duplicate key {key!r} (first given at line {first_seen[key]})"
                self.issues.append(_Issue((*loc, key), line, message))
                continue
            first_seen[key] = line
            result[key] = self.build(value_node, (*loc, key), line)
        for key_node, value_node in self._merged(node, loc, set()):
            key = self._key(key_node, loc)
            if key is not None and key not in result:
                result[key] = self.build(value_node, (*loc, key), _line(key_node))
        return result

    def _key(self, node: Node, loc: Loc) -> str | None:
        # Every key in sites.yaml is a name, so take the text as written: a
        # region called `no` must not become False (YAML 1.1 booleans).
        if isinstance(node, ScalarNode):
            return str(node.value)
        self._fail(loc, _line(node), "a mapping key must be a plain string")
        return None

    def _merged(self, node: MappingNode, loc: Loc, seen: set[int]) -> list[tuple[Node, Node]]:
        """The entries that `<<: *anchor` merge keys bring in, nearest first."""
        pairs: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, MappingNode) or id(source) in seen:
                    self._fail(loc, _line(key_node), "'<<' must merge mappings, without recursion")
                    continue
                seen.add(id(source))
                pairs += [(k, v) for k, v in source.value if k.tag != _MERGE_TAG]
                pairs += self._merged(source, loc, seen)
        return pairs


# --- pydantic errors to issues --------------------------------------------------


def _model_issues(exc: ValidationError, builder: _Builder) -> list[_Issue]:
    issues = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        if any(loc[: len(broken)] == broken for broken in builder.broken):
            continue
        if loc and loc[-1] == "[key]":  # a dict key failed: point at the key itself
            loc = loc[:-1]
        message = _message(error, loc)
        if error["type"] == DUPLICATE_SITE_ERROR:  # the model knows the first site's index
            name, first = error.get("ctx", {}).get("name"), error.get("ctx", {}).get("first")
            line = builder.lines.get(("sites", first)) if isinstance(first, int) else None
            if line is not None:
                message = f"site name {name!r} is already used by the site at line {line}"
        issues.append(_Issue(loc, _line_of(loc, builder.lines), message))
    return issues


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of the deepest part of `loc` present in the file.

    A missing field's path does not exist, so it gets its parent's line.
    """
    for depth in range(len(loc), -1, -1):
        if loc[:depth] in lines:
            return lines[loc[:depth]]
    return None


def _message(error: ErrorDetails, loc: Loc) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "required, but missing"
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    value = error.get("input")
    if kind != "value_error" and isinstance(value, str | int | float | bool):
        message += f" (got {value!r})"
    return message


def _unknown_key(loc: Loc) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if guess:
        return f"unknown key (did you mean {guess[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(allowed)})"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model that validates the value at `loc`, following Config's annotations."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]  # the item or value type
        else:
            return None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unwrap(annotation: Any) -> Any:
    """`X` from `Annotated[X, ...]` and from `X | None`."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [a for a in get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


# --- issues to problems ------------------------------------------------------------


def _to_problem(filename: str, data: Any, issue: _Issue) -> ConfigProblem:
    loc, site = issue.loc, None
    if len(loc) >= 2 and loc[0] == "sites" and isinstance(loc[1], int):
        site, loc = _site_label(data, loc[1]), loc[2:]
    return ConfigProblem(
        file=filename, line=issue.line, site=site, field=_format_loc(loc), message=issue.message
    )


def _site_label(data: Any, index: int) -> str:
    try:
        name = data["sites"][index]["name"]
    except (KeyError, IndexError, TypeError):
        name = None
    return name if isinstance(name, str) and name else f"#{index}"


def _format_loc(loc: Loc) -> str:
    """`extract.fields.price.css`, `regions[1]`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            if not part.isprintable() or not part.strip():  # keep the problem on one line
                part = repr(part)
            text += f".{part}" if text else part
    return text
