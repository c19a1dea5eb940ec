"""The pure part of the Stripe webhook mapping: which invoice / checkout lines name which
price, quantity, period, subscription and proration flag, in both line-item shapes (before
and from API 2025-03-31)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import InvalidInput
from proxy.webhooks import (
    Line,
    _micro,
    invoice_lines,
    invoice_subscription,
    line_price,
    parse_line,
    session_lines,
)


def new_shape(price: str = "price_a", **sub_item: Any) -> dict[str, Any]:
    return {"object": "line_item", "quantity": 3, "period": {"start": 10, "end": 20},
            "pricing": {"type": "price_details", "price_details": {"price": price}},
            "parent": {"type": "subscription_item_details",
                       "subscription_item_details": {"subscription": "sub_1", **sub_item}}}


def test_line_price_in_both_shapes() -> None:
    assert line_price({"price": {"id": "price_old"}}) == "price_old"
    assert line_price({"price": "price_str"}) == "price_str"
    assert line_price({"pricing": {"price_details": {"price": "price_new"}}}) == "price_new"
    assert line_price({"pricing": {"price_details": {"price": {"id": "price_obj"}}}}) == "price_obj"
    assert line_price({"price": None, "pricing": {"price_details": {"price": "p2"}}}) == "p2"
    assert line_price({"price": 7}) is None
    assert line_price({}) is None


def test_parse_new_shape_line() -> None:
    assert parse_line(new_shape()) == Line("price_a", 3, (10, 20), False, "sub_1")
    assert parse_line(new_shape(proration=True)) == Line("price_a", 3, (10, 20), True, "sub_1")


@pytest.mark.parametrize("where", ["line", "subscription_item", "invoice_item"])
def test_proration_is_read_wherever_stripe_puts_it(where: str) -> None:
    li: dict[str, Any] = {"price": {"id": "p"}, "quantity": 1}
    if where == "line":
        li["proration"] = True
    elif where == "subscription_item":
        li["parent"] = {"subscription_item_details": {"proration": True}}
    else:
        li["parent"] = {"invoice_item_details": {"proration": True}}
    line = parse_line(li)
    assert line is not None and line.proration is True


def test_proration_false_wherever_it_is_is_not_a_proration() -> None:
    for parent in ({"invoice_item_details": {"proration": False}},
                   {"subscription_item_details": {"proration": False}}, {}):
        line = parse_line({"price": "p", "parent": parent, "proration": False})
        assert line is not None and line.proration is False, parent


def test_configured_credits_are_exact_micro_or_a_clear_error() -> None:
    assert _micro("2.5") == 2_500_000
    with pytest.raises(InvalidInput) as err:
        _micro("lots")
    assert str(err.value) == "configured credits 'lots': not a number: 'lots'"


@pytest.mark.parametrize(("quantity", "parsed"), [
    (5, 5), (1, 1), (0, 1), (-2, 1), (True, 1), ("4", 1), (None, 1), (2.5, 1)])
def test_line_quantity_is_a_positive_int_else_one(quantity: object, parsed: int) -> None:
    line = parse_line({"price": "p", "quantity": quantity})
    assert line == Line("p", parsed, None, False, None)


def test_period_needs_integer_start_and_end() -> None:
    assert parse_line({"price": "p", "period": {"start": 1, "end": "2"}}) == Line("p", 1)
    assert parse_line({"price": "p", "period": {"start": 1}}) == Line("p", 1)
    assert parse_line({"price": "p", "period": {"start": 0, "end": 0}}) == Line("p", 1, (0, 0))


def test_subscription_from_the_line_or_its_parent() -> None:
    assert parse_line({"price": "p", "subscription": "sub_x"}) == Line("p", 1, None, False, "sub_x")
    assert parse_line({"price": "p", "subscription": {"id": "sub_o"}}) == \
        Line("p", 1, None, False, "sub_o")
    assert parse_line(new_shape()).subscription == "sub_1"  # type: ignore[union-attr]


def test_lines_without_a_price_or_not_objects_are_dropped() -> None:
    inv = {"lines": {"data": [{"price": "a", "quantity": 2}, "junk", {"quantity": 1}, None,
                              new_shape("b")]}}
    assert invoice_lines(inv) == [Line("a", 2), Line("b", 3, (10, 20), False, "sub_1")]
    assert invoice_lines({}) == []
    assert invoice_lines({"lines": {"data": None}}) == []
    assert parse_line(["price"]) is None


def test_invoice_subscription_in_both_shapes() -> None:
    assert invoice_subscription({"subscription": "sub_old"}) == "sub_old"
    assert invoice_subscription({"subscription": {"id": "sub_obj"}}) == "sub_obj"
    assert invoice_subscription({"parent": {"subscription_details":
                                            {"subscription": "sub_new"}}}) == "sub_new"
    assert invoice_subscription({"subscription": None, "parent": {"subscription_details":
                                                                  {"subscription": "s2"}}}) == "s2"
    assert invoice_subscription({}) is None


def test_session_lines_from_line_items_else_metadata() -> None:
    s = {"line_items": {"data": [{"price": {"id": "p"}, "quantity": 2}]},
         "metadata": {"meterproxy_price": "ignored"}}
    assert session_lines(s) == [Line("p", 2)]
    assert session_lines({"metadata": {"meterproxy_price": "pm"}}) == [Line("pm", 1)]
    assert session_lines({"metadata": {"meterproxy_price": "pm",
                                       "meterproxy_quantity": "3"}}) == [Line("pm", 3)]
    for bad_q in ("0", "-1", "x", "2.5", 4):
        assert session_lines({"metadata": {"meterproxy_price": "pm",
                                           "meterproxy_quantity": bad_q}}) == [Line("pm", 1)]
    assert session_lines({"metadata": {"meterproxy_price": ""}}) == []
    assert session_lines({"metadata": {"meterproxy_price": 5}}) == []
    assert session_lines({"line_items": {"data": [{"quantity": 1}]}}) == []
    assert session_lines({}) == []
