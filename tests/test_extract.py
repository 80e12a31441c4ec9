"""scraper.extract: pure units, no I/O."""

from __future__ import annotations

from typing import Any

import parsel
import pytest

from regions.messages import ScrapedItem
from regions.site import Extract
from scraper.extract import extract_items, parse_int, parse_number, parse_price

URL = "http://shop.test/product/SKU-1.html"

PAGE = """
<html><head><title> The  Shop </title></head><body>
<h1>
  Deluxe <em>Kettle</em>
</h1>
<p class="intro">  first  </p><p class="intro">second</p><p class="intro">   </p>
<div class="product" data-sku="A1"><span class="name">Alpha</span>
  <span class="price" data-currency="EUR">€1.234,56</span><span class="qty">3</span></div>
<div class="product" data-sku="B2"><span class="name">Beta &amp; Co</span>
  <span class="price" data-currency="USD">$1,234.56</span><span class="qty">1,000</span></div>
<div class="product"><span class="name">No sku</span><span class="price">5</span></div>
<div class="product"><span class="other">nothing we extract</span></div>
<div class="product" data-sku="C3"><span class="name">Gamma</span>
  <span class="price">call us</span><span class="qty">many</span></div>
</body></html>
"""


def spec(**kwargs: Any) -> Extract:
    return Extract.model_validate(kwargs)


def run(extract: Extract, url: str = URL, html: str = PAGE) -> tuple[list[ScrapedItem], list[str]]:
    return extract_items(parsel.Selector(text=html), url, extract)


def test_one_item_per_page_keyed_by_url_with_first_match_stripped() -> None:
    items, problems = run(spec(fields={"title": {"css": "title::text"}}))
    assert items == [ScrapedItem(key=URL, url=URL, data={"title": "The  Shop"})]
    assert problems == []


def test_first_match_skips_blank_matches() -> None:
    items, _ = run(spec(fields={"h1": {"css": "h1 ::text"}}))
    assert items[0].data == {"h1": "Deluxe"}


def test_join_strips_and_drops_empty_matches() -> None:
    items, _ = run(
        spec(
            fields={
                "h1": {"css": "h1 ::text", "join": " "},
                "intro": {"css": "p.intro::text", "join": "|"},
            }
        )
    )
    assert items[0].data == {"h1": "Deluxe Kettle", "intro": "first|second"}


def test_xpath_field() -> None:
    items, _ = run(spec(fields={"skus": {"xpath": "//div/@data-sku", "join": ","}}))
    assert items[0].data == {"skus": "A1,B2,C3"}


def test_missing_field_is_none_and_all_none_item_is_dropped_silently() -> None:
    items, problems = run(
        spec(fields={"title": {"css": "title::text"}, "nope": {"css": ".nope::text"}})
    )
    assert items[0].data == {"title": "The  Shop", "nope": None}
    assert run(spec(fields={"nope": {"css": ".nope::text"}})) == ([], [])
    assert problems == []


def test_container_items_keyed_by_position_without_key() -> None:
    items, problems = run(spec(items="div.product", fields={"name": {"css": ".name::text"}}))
    # the fourth div has no name: dropped, but positions stay those of the matches
    assert [(i.key, i.data["name"]) for i in items] == [
        (f"{URL}#0", "Alpha"),
        (f"{URL}#1", "Beta & Co"),
        (f"{URL}#2", "No sku"),
        (f"{URL}#4", "Gamma"),
    ]
    assert {i.url for i in items} == {URL}
    assert problems == []


def test_container_fields_are_relative_to_the_node_and_typed() -> None:
    items, problems = run(
        spec(
            items="div.product",
            key="sku",
            fields={
                "sku": {"css": "::attr(data-sku)"},
                "price": {"css": ".price::text", "type": "price"},
                "currency": {"css": ".price::attr(data-currency)"},
                "qty": {"css": ".qty::text", "type": "int"},
            },
        )
    )
    assert [(i.key, i.data) for i in items] == [
        ("A1", {"sku": "A1", "price": 1234.56, "currency": "EUR", "qty": 3}),
        ("B2", {"sku": "B2", "price": 1234.56, "currency": "USD", "qty": 1000}),
        ("C3", {"sku": "C3", "price": None, "currency": None, "qty": None}),
    ]
    assert problems == [
        f"item without key 'sku' on {URL}",
        f"field 'price': cannot read 'call us' as price on {URL}",
        f"field 'qty': cannot read 'many' as int on {URL}",
    ]


def test_key_value_is_a_string() -> None:
    items, _ = run(
        spec(items="div.product", key="qty", fields={"qty": {"css": ".qty::text", "type": "int"}})
    )
    assert [i.key for i in items] == ["3", "1000"]


def test_item_without_key_dropped_with_problem_on_a_single_page() -> None:
    items, problems = run(
        spec(key="sku", fields={"sku": {"css": ".sku::text"}, "title": {"css": "title::text"}})
    )
    assert items == []
    assert problems == [f"item without key 'sku' on {URL}"]


def test_pages_filter() -> None:
    extract = spec(pages=[r"/product/", r"\?special$"], fields={"title": {"css": "title::text"}})
    assert len(run(extract)[0]) == 1
    assert run(extract, url="http://shop.test/category/a/page/1.html") == ([], [])
    assert len(run(extract, url="http://shop.test/x?special")[0]) == 1
    # an empty list means every page
    assert len(run(spec(fields={"t": {"css": "title::text"}}), url="http://x.test/")[0]) == 1


def test_float_field() -> None:
    html = "<p class='a'>3.5</p><p class='b'>1,234.5</p><p class='c'>3.5 kg</p>"
    items, problems = run(
        spec(
            fields={
                "a": {"css": ".a::text", "type": "float"},
                "b": {"css": ".b::text", "type": "float"},
                "c": {"css": ".c::text", "type": "float"},
            }
        ),
        html=html,
    )
    assert items[0].data == {"a": 3.5, "b": 1234.5, "c": None}
    assert problems == [f"field 'c': cannot read '3.5 kg' as float on {URL}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.99", 12.99),
        ("€1.234,56", 1234.56),
        ("$1,234.56", 1234.56),
        ("12,99 €", 12.99),
        ("USD 5", 5.0),
        ("1 234,56 €", 1234.56),
        ("1\u00a0234,56\u00a0€", 1234.56),
        ("CHF 1'234.50", 1234.5),
        ("1.234.567,00", 1234567.0),
        ("1,234,567", 1234567.0),
        ("£0.99", 0.99),
        ("Price: 7", 7.0),
        ("-3.50 EUR", -3.5),
        ("N/A", None),
        ("", None),
        ("free", None),
    ],
)
def test_parse_price(text: str, expected: float | None) -> None:
    assert parse_price(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("42", 42), (" -7 ", -7), ("1,234", 1234), ("1 234", 1234), ("1.5", None), ("x", None)],
)
def test_parse_int(text: str, expected: int | None) -> None:
    assert parse_int(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.25", 3.25), ("3,25", 3.25), ("1,234.5", 1234.5), ("1e5", None), ("3 apples", None)],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


def test_price_problem_and_none_value() -> None:
    items, problems = run(
        spec(fields={"p": {"css": "p::text", "type": "price"}, "t": {"css": "title::text"}}),
        html="<title>x</title><p>sold out</p>",
    )
    assert items[0].data == {"p": None, "t": "x"}
    assert problems == [f"field 'p': cannot read 'sold out' as price on {URL}"]
