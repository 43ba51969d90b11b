"""Typed tables: cells hold numbers and marks; Markdown and HTML are rendered from them.

Every table patchbench writes (leaderboards, checks, ``speed``, ``regress``) is a
:class:`Table` of :class:`Cell` objects. A cell keeps its value as a number, so a renderer
knows which columns are numeric (right-aligned) without reading formatted strings back,
and the verdict of a cell (best, tie, ...) is a mark, not a ``**`` in its text.
:func:`markdown` is the one Markdown renderer; ``report.py`` renders the same tables as HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MARKS = ("", "best", "tie", "worse", "fail", "pass", "flag")
MISSING = "–"  # a number that is not there (not computed, NaN, not applicable)


@dataclass(frozen=True)
class Cell:
    """One table cell.

    Attributes:
        value: A number (``int`` or ``float``), a text, or None for a missing number.
            NaN and infinities show as :data:`MISSING`.
        fmt: Format spec of a number, e.g. ``".3f"``, ``"+.4f"``, ``".1e"``.
        low: Lower end of an interval shown after the number (``[low, high]``), or None.
        high: Upper end of the interval.
        mark: The cell's verdict, one of :data:`MARKS`; ``best`` numbers are shown in bold.
        suffix: A sign after the number, e.g. ``"≈"`` (tie) or ``"×"``; in HTML it sits in a
            column of its own so that the numbers stay aligned.
        seeds: ``(low, high, n)``: the range of the value over n training seeds, shown after
            the interval, or None.
    """

    value: float | int | str | None
    fmt: str = ""
    low: float | None = None
    high: float | None = None
    mark: str = ""
    suffix: str = ""
    seeds: tuple[float, float, int] | None = None

    def __post_init__(self) -> None:
        for name in ("value", "low", "high"):  # numpy scalars -> Python numbers
            v = getattr(self, name)
            if hasattr(v, "item") and not isinstance(v, str):
                object.__setattr__(self, name, v.item())
        if self.mark not in MARKS:
            raise ValueError(f"unknown mark {self.mark!r}; valid: {MARKS}")

    @property
    def numeric(self) -> bool:
        """A number, or a missing one (None)."""
        value = self.value
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))

    @property
    def number(self) -> str:
        """The value as text (a number formatted by :attr:`fmt`), without interval or suffix."""
        if not self.numeric:
            return str(self.value)
        if self.value is None or (isinstance(self.value, float) and not math.isfinite(self.value)):
            return MISSING
        return format(self.value, self.fmt)

    @property
    def interval(self) -> str:
        """``"[0.401, 0.622]"`` in the value's format, or ``""`` without an interval."""
        if self.low is None or self.high is None:
            return ""
        return f"[{format(self.low, self.fmt)}, {format(self.high, self.fmt)}]"

    @property
    def seed_range(self) -> str:
        """``"seeds 3: 0.751–0.770"`` in the value's format, or ``""``."""
        if self.seeds is None:
            return ""
        low, high, n = self.seeds
        return f"seeds {n}: {format(low, self.fmt)}–{format(high, self.fmt)}"

    @property
    def bold(self) -> bool:
        return self.mark == "best" and self.numeric

    def text(self, bold: str = "") -> str:
        """Plain text of the cell; ``bold`` (e.g. ``"**"``) wraps the number of a best cell."""
        number = f"{bold}{self.number}{bold}" if self.bold and bold else self.number
        return " ".join(part for part in (number, self.interval, self.seed_range, self.suffix) if part)


def cell(value: Any) -> Cell:
    """A :class:`Cell` from a plain value (a Cell stays as it is)."""
    return value if isinstance(value, Cell) else Cell(value)


@dataclass
class Table:
    """A table with a title and notes.

    Attributes:
        title: Heading of the table.
        header: Column names.
        rows: One list per row; plain values are turned into cells (see :func:`cell`).
        notes: Paragraphs printed under the table (Markdown ``**bold**`` and ```code``` allowed).
    """

    title: str
    header: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = [[cell(v) for v in row] for row in self.rows]

    @property
    def numeric(self) -> list[bool]:
        """Per column: is it a column of numbers (at least as many numbers as texts)? A
        ``failed: ...`` text in a column of scores leaves it numeric."""
        width = max([len(self.header), *(len(r) for r in self.rows)])
        out = []
        for c in range(width):
            cells = [r[c] for r in self.rows if c < len(r)]
            numbers = sum(x.numeric and x.value is not None for x in cells)
            texts = sum(not x.numeric and x.value != "" for x in cells)
            out.append(numbers > 0 and numbers >= texts)
        return out


def markdown(table: Table, heading: str | None = "###", notes: bool = True) -> str:
    """A table as Markdown: ``heading title``, a pipe table (numeric columns right-aligned),
    then its notes.

    Args:
        table: The table.
        heading: Heading mark before the title (``"##"``, ``"###"``); None: no title line.
        notes: Print the notes under the table.
    """
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    align = ["---:" if n else "---" for n in table.numeric][: len(table.header)]
    lines = [f"{heading} {table.title}", ""] if heading else []
    lines += [line(table.header), "|" + "|".join(align) + "|"]
    lines += [line([c.text("**") for c in row]) for row in table.rows]
    if notes and table.notes:
        lines += ["", *table.notes]
    return "\n".join(lines) + "\n"
