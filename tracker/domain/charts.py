"""Geometry of the overview's SVG charts: horizontal stacked bars and a column per hour."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class BarChart:
    width: int
    height: int
    label_width: int
    rows: list[dict[str, object]] = field(default_factory=list)


def bars(rows: Sequence[tuple[str, Sequence[tuple[float, str]], str]], width: int = 720, label_width: int = 190,
         row_height: int = 28) -> BarChart:
    """One row per (label, [(value, css class), ...] stacked left to right, note shown after the bar),
    all to one scale: the longest row fills the plot."""
    plot = width - label_width - 200
    top = max([sum(v for v, _ in parts) for _, parts, _ in rows] + [1e-9])
    out = []
    for i, (label, parts, note) in enumerate(rows):
        x = float(label_width)
        pieces = []
        for value, cls in parts:
            w = value / top * plot if top else 0
            if w > 0:
                pieces.append({"x": round(x, 1), "w": round(max(w, 1.5), 1), "cls": cls})
            x += w
        out.append({"label": label, "y": i * row_height + 4, "pieces": pieces, "note": note,
                    "note_x": round(x + 8, 1)})
    return BarChart(width, max(len(rows), 1) * row_height + 8, label_width, out)


@dataclass
class Columns:
    width: int
    height: int
    base: int
    columns: list[dict[str, object]]
    top_label: str


def columns(values: list[tuple[str, int]], width: int = 720, height: int = 170) -> Columns:
    """A column per (label, count), e.g. activations per hour; every 3rd label is printed."""
    base, left = height - 24, 36
    top = max([v for _, v in values] + [1])
    step = (width - left) / max(len(values), 1)
    cols = []
    for i, (label, v) in enumerate(values):
        h = v / top * (base - 16)
        cols.append({"x": round(left + i * step + 2, 1), "w": round(step - 4, 1), "y": round(base - h, 1),
                     "h": round(h, 1), "label": label if i % 3 == 0 else "", "value": v,
                     "label_x": round(left + i * step + step / 2, 1)})
    return Columns(width, height, base, cols, f"{top:,}")
