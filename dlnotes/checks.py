"""Argument checks shared by every module, so that the same mistake gets the same message.

Each check returns the value in its canonical Python type or raises ``ValueError`` naming the
argument, the function or class it was given to (``owner``) and the value it got::

    positive_int(0, "initial_filters", "build_darknet53")
    # ValueError: build_darknet53: initial_filters must be a positive integer, got 0.
"""

from __future__ import annotations

import numbers

__all__ = ["check_num_classes", "integer", "positive_int"]


def _prefix(owner):
    return f"{owner}: " if owner else ""


def integer(value, what, owner=None, minimum=None):
    """``value`` as an ``int`` (a Python or NumPy integer, or an integral float such as ``3.0``).

    Booleans, strings, non-integral numbers and values below ``minimum`` raise ``ValueError``
    with a message that names ``what`` and ``owner``.
    """
    if minimum == 1:
        kind = "a positive integer"
    else:
        kind = "an integer" if minimum is None else f"an integer >= {minimum}"
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and float(value).is_integer()
    )
    if isinstance(value, bool) or not integral or (minimum is not None and value < minimum):
        raise ValueError(f"{_prefix(owner)}{what} must be {kind}, got {value!r}.")
    return int(value)


def positive_int(value, what, owner=None):
    """``value`` as an ``int`` >= 1, else ``ValueError`` naming ``what`` (and ``owner``)."""
    return integer(value, what, owner, minimum=1)


def check_num_classes(num_classes, owner=None):
    """``num_classes`` as a positive ``int`` (the number of object classes, no background)."""
    return positive_int(num_classes, "num_classes", owner)
