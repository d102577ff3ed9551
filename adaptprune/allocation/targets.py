"""Parameter targets written as text: ``'90M'``, ``'1.2B'``, ``'134515008'`` or ``'0.7x'``."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
_TARGET = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmbx]?)$", re.IGNORECASE)


def parse_target(text: str, total_params: int) -> int:
    """A parameter count from ``'90M'``, ``'1.2B'``, ``'500k'``, ``'134515008'`` or ``'0.7x'`` (× total).

    The result must lie in [1, total_params); anything else raises a one-line ``ValueError``.
    """
    match = _TARGET.match(str(text).strip().replace("_", ""))
    if not match:
        raise ValueError(
            f"target_params '{text}' is not a count like '90M', '1.2B', '134515008' or a ratio like '0.7x'"
        )
    number, suffix = match.group(1), match.group(2).lower()
    value = float(number)
    if suffix == "x":
        if not 0.0 < value < 1.0:
            raise ValueError(f"target_params ratio '{text}' must lie strictly between 0 and 1")
        count = round(value * total_params)
    elif suffix == "" and "." in number:
        raise ValueError(f"target_params '{text}' must be a whole number of parameters (or use K/M/B or x)")
    else:
        count = round(value * _SUFFIX[suffix])
    if not 0 < count < total_params:
        raise ValueError(f"target_params '{text}' = {count:,} must lie between 1 and the model's {total_params:,} - 1")
    return count
