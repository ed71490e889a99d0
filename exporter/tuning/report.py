"""Plain-text tables and number formatting shared by the commands' human-readable output."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1,
          text_columns: Sequence[int] = ()) -> str:
    """The first `left` columns and `text_columns` left-aligned, the others right-aligned.

    None prints as '-'.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i < left or i in text_columns else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def size(n_bytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (KiB to TiB)."""
    value, unit = float(n_bytes), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:,.2f} {unit}" if unit != "bytes" else f"{int(value):,} bytes"


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
