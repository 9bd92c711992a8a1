"""Parsing of human numbers (``1e21``, ``7.5B``, ``363e9``) with errors that name the flag or key."""

from __future__ import annotations

import math

from domainlm.errors import UserError

# Suffixes people write for parameter and token counts (7B, 1.4T) and for FLOPs.
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_number(text: str | float | int, what: str, *, positive: bool = True) -> float:
    """Parse ``text`` as a finite number. ``what`` names the flag or key in the error."""
    if isinstance(text, bool):
        raise UserError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        raw = str(text).strip().replace("_", "").replace(",", "")
        mult = 1.0
        if raw and raw[-1].lower() in _SUFFIX and not raw.lower().endswith("e"):
            mult = _SUFFIX[raw[-1].lower()]
            raw = raw[:-1]
        try:
            value = float(raw) * mult
        except ValueError:
            raise UserError(f"{what}: expected a number like 1e21 or 7.5B, got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{what}: expected a finite number, got {text!r}")
    if positive and value <= 0:
        raise UserError(f"{what}: expected a number > 0, got {text!r}")
    return value


def parse_assignments(items: list[str] | None, what: str, *, positive: bool = True) -> dict[str, float]:
    """Parse repeated ``NAME=NUMBER`` flags (``--weight legal=0.51``) into a dict."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"{what}: expected NAME=NUMBER, got {item!r}")
        if name in out:
            raise UserError(f"{what}: source {name!r} given twice")
        out[name] = parse_number(value, f"{what} {name}", positive=positive)
    return out


def human(x: float, unit: str = "") -> str:
    """1.23e9 -> '1.23B' (counts), keeping three significant digits."""
    if x is None:
        return "-"
    for div, s in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{s}{unit}"
    return f"{x:.3g}{unit}"
