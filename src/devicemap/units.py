"""Byte sizes: parse what users write ("10GiB", "1.5 TB", 2**30) and format for people; lists of names for messages."""

import re
from collections.abc import Sequence

from .errors import DeviceMapError

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
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Return a positive number of bytes for an int or a string with a unit.

    >>> parse_size("1.5 GiB")
    1610612736
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DeviceMapError(f"size {value!r} is not a number of bytes or a string such as '10GiB' or '500MB'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise DeviceMapError(
                f"size {value!r} is not understood; write a number of bytes or a number with "
                "a unit: B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)"
            )
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise DeviceMapError(f"size {value!r} must be more than zero bytes")
    return size


def format_size(num_bytes: int | float) -> str:
    """Format bytes in binary units with one decimal, e.g. ``"131.4 GiB"``.

    >>> format_size(3 * 2**30)
    '3.0 GiB'
    """
    sign = "-" if num_bytes < 0 else ""
    amount = abs(float(num_bytes))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{sign}{amount:.0f} {unit}" if unit == "B" else f"{sign}{amount:.1f} {unit}"
        amount /= 1024
    return f"{sign}{amount:.1f} TiB"


def split_assignments(text: str, *, key: str, example: str) -> list[tuple[str, str]]:
    """Split "KEY=SIZE,KEY=SIZE" into (key, size) pairs of stripped strings; ``key`` and ``example`` word the error.

    >>> split_assignments("0=24GiB, cpu=64GiB", key="DEVICE", example="0=24GiB,cpu=64GiB")
    [('0', '24GiB'), ('cpu', '64GiB')]
    """
    pairs = []
    for part in filter(str.strip, text.split(",")):
        name, sep, size = part.partition("=")
        if not sep or not name.strip() or not size.strip():
            raise DeviceMapError(f"max_memory entry {part.strip()!r} is not {key}=SIZE; write e.g. {example!r}")
        pairs.append((name.strip(), size.strip()))
    return pairs


def first_of(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are.

    >>> first_of(["a", "b", "c", "d"], 2)
    'a, b … and 2 more'
    """
    shown = ", ".join(names[:limit])
    return f"{shown} … and {len(names) - limit} more" if len(names) > limit else shown
