"""Annotation and label templates: the subset of Prometheus's Go templates rules may use.

Supported: `{{ $value }}`, `{{ $labels.NAME }}`, each optionally piped through `humanize`,
`humanize1024`, `humanizeDuration` or `humanizePercentage` (`{{ $value | humanizeDuration }}`).
Prometheus renders the same text for exported rules, so the rendering here follows Go's
formatting.
"""

from __future__ import annotations

import math
import re

from .promfuncs import humanize, humanize_1024, humanize_duration, humanize_percentage

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_TERM = re.compile(r"^\$value$|^\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)$")
FUNCTIONS = {
    "humanize": humanize,
    "humanize1024": humanize_1024,
    "humanizeDuration": humanize_duration,
    "humanizePercentage": humanize_percentage,
}


def check_template(text: str) -> str | None:
    """None if `text` uses only supported actions, else what is wrong."""
    if text.count("{{") != text.count("}}"):
        return "unbalanced {{ }}"
    for action in _ACTION.findall(text):
        problem = _check_action(action)
        if problem:
            return problem
    return None


def _check_action(action: str) -> str | None:
    term, *pipes = [part.strip() for part in action.split("|")]
    if not _TERM.match(term):
        return (f"unsupported template expression {{{{ {action} }}}}: use $value or "
                f"$labels.NAME, optionally | {' | '.join(FUNCTIONS)}")
    for fn in pipes:
        if fn not in FUNCTIONS:
            return f"unknown template function {fn!r}; known: {', '.join(FUNCTIONS)}"
        if term != "$value":
            return f"{fn} applies to $value only"
    return None


def render(text: str, labels: dict[str, str], value: float) -> str:
    def action(match: re.Match) -> str:
        term, *pipes = [part.strip() for part in match.group(1).split("|")]
        if term == "$value":
            if not pipes:
                return go_float(value)
            out = value
            for fn in pipes:
                out = FUNCTIONS[fn](out)
            return str(out)
        name = term[len("$labels."):]
        return labels.get(name, "<no value>")
    return _ACTION.sub(action, text)


def go_float(value: float) -> str:
    """Go's fmt %v of a float64: shortest digits, exponent form below 1e-4 and from 1e6
    (strconv's %g with the shortest precision)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    digits = repr(value)
    mantissa = digits.split("e")[0].lstrip("-").replace(".", "").lstrip("0").rstrip("0") or "0"
    exponent = math.floor(math.log10(abs(value)))
    # repr rounding can push log10 across a power of ten; check against the formatted value
    if float(f"1e{exponent}") > abs(value):
        exponent -= 1
    if exponent < -4 or exponent >= 6:
        return format(value, f".{max(len(mantissa) - 1, 0)}e")
    text = format(value, f".{max(len(mantissa) - 1 - exponent, 0)}f")
    return text
