"""Every merge method by name: the data-free ones (``merge_ops``) and the data-driven ones (``fit``).

The one place that completes the registry with the data-driven methods, so that ``merge_ops`` (pure
maths) never imports ``fit`` (torch models, lm-eval data).  ``fit`` is imported only when a name is
not a data-free method (or the whole list is asked for): a data-free merge does not pay its imports.
"""

from __future__ import annotations

from mergescale import merge_ops  # noqa: F401  (importing it registers the data-free methods)
from mergescale.errors import SpecError
from mergescale.merge_ops.registry import METHODS, Method


def _all() -> dict[str, type[Method]]:
    from mergescale import fit  # noqa: F401  (registers the data-driven methods)

    return METHODS


def get_method(name: str) -> Method:
    cls = METHODS.get(name) or _all().get(name)
    if cls is None:
        raise SpecError(f"unknown merge method {name!r}; known: {', '.join(method_names())}")
    return cls()


def method_names() -> list[str]:
    return sorted(_all())
