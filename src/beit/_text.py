"""Plain-text helpers for messages, shared by every room (the bottom room: it imports nothing of ``beit``)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["ALIKE_ON_EVERY_RANK", "first_few", "repeated", "strict_json"]

#: ``extra=`` of a log warning that every rank of a torchrun job would print alike, word for word: one about the
#: config, a checkpoint or a folder that they all read (``data.crop_padding`` ignored, a checkpoint's missing
#: tensors). Ranks other than the first drop it from their console (``beit.engine.logging.setup_logging``); a
#: warning about what one rank meets alone (a bad file of its share of the samples, its GPU) goes without it.
ALIKE_ON_EVERY_RANK: dict[str, bool] = {"alike_on_every_rank": True}


def first_few(items: Sequence[object], n: int, *, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` (each as ``str``), then how many more: ``"a, b, c and 7 more"``.

    The one wording of every message that names a few of many things (files, classes, tensors, ids). All of
    ``items`` are shown when there are at most ``n``; an empty ``items`` gives ``""``. ``sep`` joins the shown
    items (``"; "`` where an item holds commas itself). Pass ``[repr(x) for x in items]`` where the quotes
    matter (an id ``'7'`` is not ``7``).

    Raises:
        ValueError: ``n`` is below 1 (``" and 7 more"`` names nothing).
    """
    if n < 1:
        raise ValueError(f"first_few shows at least one item, not n={n}")
    shown = sep.join(str(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def repeated(items: Sequence[object], n: int) -> str:
    """The items given more than once in ``items``, each with its count, in order of first appearance: the first
    ``n``, then how many more (:func:`first_few`): ``"'a' (2 times), 'b' (3 times) and 2 more"``; ``""`` when
    none repeats.

    The one wording of every message that lists duplicates; callers say what was repeated
    (``f"... given more than once: {repeated(names, 5)}"``). Items are shown by ``repr`` (a file name, an id
    ``'7'`` that is not ``7``).

    Raises:
        ValueError: ``n`` is below 1 (from :func:`first_few`).
    """
    counts = Counter(items)
    return first_few([f"{x!r} ({c} times)" for x, c in counts.items() if c > 1], n)


def strict_json(obj: object, indent: int | None = 1) -> str:
    """``obj`` as strict JSON: a float that is NaN or infinite (a metric of a class absent from both the labels and
    the predictions, say) becomes ``null``, which every JSON reader takes (``NaN`` is not JSON); tuples become
    lists. Used for the ``metrics.json`` files that tools read.

    Raises:
        TypeError: a value JSON cannot hold (from :func:`json.dumps`).
    """
    def clean(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)
