"""Extraction: a site's `extract` spec applied to one parsed page. Pure, no I/O.

    items, problems = extract_items(page_selector(html, spec.parser), url, spec)

- Pages are parsed as `spec.parser` says (html by default), never by parsel's
  guess: an XHTML page starting with `<?xml ...?>` would otherwise be parsed as
  XML, and CSS selectors find nothing in the XHTML namespace.

- `spec.pages`: when non-empty, only pages whose URL matches one of the regexes
  (re.search) yield items.
- `spec.items`: a CSS selector; one item per matched node, with the fields
  evaluated relative to that node. Without it, one item per page.
- A field is a CSS or XPath selector. With `join`, every match (stripped, empty
  ones skipped) joined with it; otherwise the first non-empty match, stripped.
  No match: None. Selecting an element rather than text/attributes yields its
  HTML, as in parsel.
- `type`: str, int, float or price. A value that does not convert becomes None
  and a problem.
- Items whose fields are all None are dropped (silently: the page simply has
  none). With `spec.key`, an item whose key field is None is dropped with a
  problem. Without `spec.key` the key is the URL (one item per page) or
  "<url>#<n>", n being the 0-based position of the node among the matches.
"""

from __future__ import annotations

import re
from typing import Any

import parsel

from regions.messages import ScrapedItem
from regions.site import Extract, ExtractField

__all__ = [
    "extract_items",
    "extract_value",
    "page_selector",
    "parse_int",
    "parse_number",
    "parse_price",
]

# A number with optional thousands groups ("1 234", "1'234") and separators.
_NUMBER_RE = re.compile(
    r"[-+\u2212]?\d+(?:(?:[ \u00a0\u202f']\d{3}(?!\d))|(?:[.,]\d+))*",
)
MINUS = "\u2212"  # U+2212, typographic minus
_GROUPING = str.maketrans("", "", " \u00a0\u202f'_")


def _normalise_number(text: str) -> str:
    """'1.234,56' / '1,234.56' / '1 234,56' / '12,99' -> a string float() takes."""
    text = text.translate(_GROUPING).replace(MINUS, "-")
    if "," in text and "." in text:
        decimal = "," if text.rfind(",") > text.rfind(".") else "."
        thousands = "." if decimal == "," else ","
        return text.replace(thousands, "").replace(decimal, ".")
    for sep in (",", "."):
        if sep in text:
            head, _, tail = text.rpartition(sep)
            if text.count(sep) > 1:
                return text.replace(sep, "")  # only thousands groups: 1,234,567
            if sep == "," and len(tail) == 3:
                return text.replace(sep, "")  # 1,234 reads as thousands
            return f"{head}.{tail}"  # 12,99 / 12.99 / 1.234 (a decimal point)
    return text


def parse_number(text: str) -> float | None:
    """A plain number with either decimal convention; None when there is none.

    The whole text must be the number (surrounding whitespace aside).
    """
    stripped = text.strip()
    match = _NUMBER_RE.fullmatch(stripped)
    if match is None:
        return None
    try:
        return float(_normalise_number(stripped))
    except ValueError:
        return None


def parse_price(text: str) -> float | None:
    """'12.99', '€1.234,56', '$1,234.56', '12,99 €', 'USD 5' -> float; else None.

    The first number in the text is the price; currency symbols and codes
    around it are ignored. Text with no digits is not a price.
    """
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    try:
        return float(_normalise_number(match.group(0)))
    except ValueError:
        return None


def parse_int(text: str) -> int | None:
    """'42', '-7', '1,234', '1 234' -> int; None for anything else (incl. '1.5')."""
    cleaned = text.strip().translate(_GROUPING).replace(",", "").replace(MINUS, "-")
    if not re.fullmatch(r"[-+]?\d+", cleaned):
        return None
    return int(cleaned)


def _convert(raw: str, field_type: str) -> Any:
    if field_type == "str":
        return raw
    if field_type == "int":
        return parse_int(raw)
    if field_type == "float":
        return parse_number(raw)
    return parse_price(raw)


def page_selector(text: str, parser: str = "html") -> parsel.Selector:
    """A page's text parsed as `parser` ("html" or "xml"), never guessed."""
    return parsel.Selector(text=text, type=parser)


def extract_value(node: parsel.Selector, field: ExtractField) -> str | None:
    """The raw (unconverted) string of one field on one node, or None."""
    matches = node.css(field.css) if field.css is not None else node.xpath(field.xpath or "")
    values = (value.strip() for value in matches.getall())
    if field.join is not None:
        joined = field.join.join(v for v in values if v)
        return joined or None
    return next((v for v in values if v), None)


def extract_items(
    selector: parsel.Selector, url: str, spec: Extract
) -> tuple[list[ScrapedItem], list[str]]:
    """Items found on one page and the problems met on the way."""
    if spec.pages and not any(re.search(pattern, url) for pattern in spec.pages):
        return [], []
    nodes: list[parsel.Selector] = (
        list(selector.css(spec.items)) if spec.items is not None else [selector]
    )
    items: list[ScrapedItem] = []
    problems: list[str] = []
    for position, node in enumerate(nodes):
        data: dict[str, Any] = {}
        for name, field in spec.fields.items():
            raw = extract_value(node, field)
            value = None if raw is None else _convert(raw, field.type)
            if raw is not None and value is None:
                problems.append(f"field {name!r}: cannot read {raw!r} as {field.type} on {url}")
            data[name] = value
        if all(value is None for value in data.values()):
            continue
        if spec.key is not None:
            key_value = data[spec.key]
            if key_value is None:
                problems.append(f"item without key {spec.key!r} on {url}")
                continue
            key = str(key_value)
        elif spec.items is not None:
            key = f"{url}#{position}"
        else:
            key = url
        items.append(ScrapedItem(key=key, url=url, data=data))
    return items, problems
