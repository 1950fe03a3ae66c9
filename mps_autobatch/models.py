"""Models by timm name: check a name (with the likely intended one for a typo) and build it without weights.

Example:
    >>> check_model_name("resnt18")
    Traceback (most recent call last):
    ...
    ValueError: Unknown timm model 'resnt18'. Did you mean 'resnet18'? List names with timm.list_models('resnt18*').
"""

from __future__ import annotations

import difflib
from typing import Any

__all__ = ["check_model_name", "create_model"]


def _suggest(name: str, names: list[str]) -> str | None:
    """The model name a typo most likely meant: common slips first (0/o, 1/l, -/_, case), then difflib."""
    slips = name.lower().replace("-", "_")
    for candidate in (slips, slips.replace("o", "0"), slips.replace("l", "1")):
        if candidate in names:
            return candidate
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None


def check_model_name(name: str) -> None:
    """Raise a one-line `ValueError` naming the closest timm model when ``name`` is not one.

    Example:
        >>> check_model_name("resnet18")  # a known name: nothing happens
    """
    import timm

    if not isinstance(name, str):
        raise TypeError(f"A model name must be a string, got {name!r}.")
    if not timm.is_model(name):
        close = _suggest(name, timm.list_models())
        hint = f" Did you mean {close!r}?" if close else ""
        raise ValueError(
            f"Unknown timm model {name!r}.{hint} List names with timm.list_models('{name.split('_')[0]}*')."
        )


def create_model(name: str, num_classes: int | None = None) -> Any:
    """``timm.create_model(name)`` without pretrained weights, with a ``num_classes`` head when given.

    Example:
        >>> create_model("test_efficientnet", num_classes=10).num_classes
        10
    """
    import timm

    check_model_name(name)
    classes: dict[str, Any] = {"num_classes": num_classes} if num_classes is not None else {}
    return timm.create_model(name, pretrained=False, **classes)
