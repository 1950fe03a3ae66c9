"""A package's public names, imported from their modules on first use (PEP 562), so importing it stays light.

Example:
    >>> __getattr__ = lazy_attributes("json", {"JSONDecoder": "decoder"})
    >>> __getattr__("JSONDecoder").__name__
    'JSONDecoder'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that loads ``name`` from ``package.<homes[name]>`` when first asked for."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    return __getattr__
