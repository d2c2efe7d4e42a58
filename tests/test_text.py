"""``beit._text``: the one wording of "the first few names, then how many more" (``first_few``) and of "given more
than once" (``repeated``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from beit._text import first_few, repeated


def test_the_first_n_then_how_many_more() -> None:
    names = [f"n{i}" for i in range(10)]
    assert first_few(names, 3) == "n0, n1, n2 and 7 more"
    assert first_few(names, 1) == "n0 and 9 more"
    assert first_few(names[:4], 3) == "n0, n1, n2 and 1 more"  # n + 1: the one left is counted, not shown
    assert first_few(names[:3], 3) == "n0, n1, n2"  # exactly n: all shown, no count
    assert first_few(names[:2], 3) == "n0, n1"
    assert first_few(names, 10) == first_few(names, 50) == ", ".join(names)


def test_an_empty_list_is_the_empty_string() -> None:
    assert first_few([], 5) == ""
    assert (first_few([], 5) or "none") == "none"  # callers say what none is


def test_items_that_are_not_strings_are_shown_by_str() -> None:
    assert first_few([3, 7, 11, 12], 2) == "3, 7 and 2 more"
    assert first_few([(14, 16), (16, 14)], 4) == "(14, 16), (16, 14)"
    assert first_few([Path("a/b.png"), None, 1.5], 3) == "a/b.png, None, 1.5"
    assert first_few([repr("7"), repr(7)], 5) == "'7', 7"  # repr where the quotes matter
    assert first_few(("x", "y", "z"), 2) == "x, y and 1 more"  # any sequence


def test_another_separator_for_items_that_hold_commas() -> None:
    items = ["a.png (cannot read, truncated)", "b.png (empty)", "c.png (empty)"]
    assert first_few(items, 2, sep="; ") == "a.png (cannot read, truncated); b.png (empty) and 1 more"


@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match=f"first_few shows at least one item, not n={n}"):
        first_few(["a"], n)


def test_repeated_items_with_their_counts_in_order_of_first_appearance() -> None:
    """Duplicates read "'a' (2 times), 'b' (3 times) and 2 more" (was "'a' is given 2 times and 2 more")."""
    items = ["b", "a", "b", "c", "a", "b", "d", "e", "d", "e"]
    assert repeated(items, 5) == "'b' (3 times), 'a' (2 times), 'd' (2 times), 'e' (2 times)"
    assert repeated(items, 2) == "'b' (3 times), 'a' (2 times) and 2 more"
    assert repeated(["x", "y"], 3) == "" and repeated([], 3) == ""  # nothing repeats: callers do not say it
    assert repeated(["7", 7, "7"], 3) == "'7' (2 times)"  # by repr: an id '7' is not 7
    with pytest.raises(ValueError, match="first_few shows at least one item, not n=0"):
        repeated(["a", "a"], 0)


def test_strict_json_writes_null_for_nan_and_infinities():
    import json

    from beit._text import strict_json

    text = strict_json({"IoU": [1.0, float("nan")], "mIoU": float("inf"), "ok": (1, "a"), "n": {"x": -float("inf")}})
    assert json.loads(text) == {"IoU": [1.0, None], "mIoU": None, "ok": [1, "a"], "n": {"x": None}}
    assert "NaN" not in text and "Infinity" not in text
