"""Byte sizes: parse what users type ("8GiB", "512MB", "1073741824") and print what they read."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Turn a size such as ``"8GiB"``, ``"512MB"`` or ``1073741824`` into bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024,
    as their names say; case does not matter.

    Args:
        value: a positive number of bytes, or a string with one of the units above.

    Returns:
        The size in bytes.

    Raises:
        ValueError: the value is not a positive size.

    Example:
        >>> parse_size("8GiB"), parse_size("512MB"), parse_size(1024)
        (8589934592, 512000000, 1024)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"A memory size must be an int or a string such as '8GiB', got {value!r}.")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"Cannot read the memory size {value!r}. Write a number of bytes or one with a unit, "
                "such as '8GiB', '512MiB' or '16GB'."
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"A memory size must be positive, got {value!r}. Pass a size such as '8GiB'.")
    return size


def format_bytes(size: int | float | None) -> str:
    """Print a byte count the way people read it: GiB/MiB with two decimals.

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(1536 * 2**10), format_bytes(None)
        ('3.00 GiB', '1.50 MiB', '-')
    """
    if size is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"
