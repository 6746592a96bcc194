"""Geometry of the click timeline, drawn to scale in time (numbers only; the template draws them).

The session window is minutes to hours long and postbacks come days later, so one linear axis
would crush the session into a few pixels. When anything happens well after the session, the axis
has two linear parts: the session window on the left 62 %, what came after on the rest, with a
visible break between them and each part's own ticks. Markers that would overlap are stacked."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from .timeline import Moment

WIDTH, LEFT, RIGHT = 960, 24, 24
TOP, LANE_H, MIN_GAP, MAX_LANES = 16, 26, 22, 5
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
          2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400, 90 * 86400)


@dataclass
class Segment:
    start: float  # seconds after activation
    end: float
    x0: float
    x1: float

    def x(self, t: float) -> float:
        span = max(self.end - self.start, 1e-9)
        return self.x0 + (min(max(t, self.start), self.end) - self.start) / span * (self.x1 - self.x0)


@dataclass
class Drawing:
    width: int
    height: int
    axis_y: int
    segments: list[Segment]
    ticks: list[tuple[float, str]] = field(default_factory=list)
    markers: list[dict[str, object]] = field(default_factory=list)
    bands: list[tuple[float, float, str, str]] = field(default_factory=list)  # x0, x1, class, label
    break_x: float | None = None
    label_xs: list[float] = field(default_factory=list)


def tick_label(seconds: float) -> str:
    s = int(seconds)
    if s == 0:
        return "0"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h" + (f"{s % 3600 // 60:02d}" if s % 3600 else "")
    return f"{s // 86400}d" + (f"{s % 86400 // 3600}h" if s % 86400 else "")


def _ticks(seg: Segment, first: bool) -> list[tuple[float, str]]:
    span = seg.end - seg.start
    step = next((s for s in _STEPS if span / s <= 6), _STEPS[-1])
    t = (seg.start // step + (0 if first else 1)) * step
    out = []
    while t <= seg.end + 1e-6:
        out.append((seg.x(t), tick_label(t)))
        t += step
    return out


def _segments(last: float, ttl: float) -> list[Segment]:
    x_end = WIDTH - RIGHT
    if last <= ttl * 1.25:
        return [Segment(0, max(ttl, last), LEFT, x_end)]
    split = LEFT + (x_end - LEFT) * 0.62
    return [Segment(0, ttl, LEFT, split), Segment(ttl, last, split + 18, x_end)]


def layout(moments: list[Moment], start: datetime, session_ttl: int, overwritten_at: datetime | None) -> Drawing:
    offsets = [(m.at - start).total_seconds() for m in moments]
    last = max([session_ttl, *offsets])
    segs = _segments(last * 1.02 if last > session_ttl * 1.25 else last, session_ttl)

    def x_of(t: float) -> float:
        return next((s for s in segs if t <= s.end), segs[-1]).x(t)

    lanes: list[float] = []
    placed = []
    for m, t in zip(moments, offsets):
        x = x_of(t)
        lane = next((i for i, right in enumerate(lanes) if right + MIN_GAP <= x), None)
        if lane is None and len(lanes) < MAX_LANES:
            lanes.append(x)
            lane = len(lanes) - 1
        elif lane is None:  # crowded: the lane free the longest
            lane = min(range(len(lanes)), key=lanes.__getitem__)
        lanes[lane] = x
        placed.append((m, x, lane))
    axis_y = TOP + (len(lanes) - 1) * LANE_H + 24  # as tall as the stacked markers need, no taller
    markers = [{"x": round(x, 1), "y": axis_y - 24 - lane * LANE_H, "n": n, "kind": m.kind, "late": m.late,
                "title": f"{m.offset} {m.title}"} for n, (m, x, lane) in enumerate(placed, start=1)]
    session_end = x_of(session_ttl)
    bands: list[tuple[float, float, str, str]] = []
    cut = (overwritten_at - start).total_seconds() if overwritten_at else None
    if cut is not None and cut < session_ttl:
        bands.append((float(LEFT), x_of(cut), "band-session", "session window"))
        bands.append((x_of(cut), session_end, "band-lost", "overwritten: not ours any more"))
    else:
        bands.append((float(LEFT), session_end, "band-session", f"session window ({tick_label(session_ttl)})"))
    ticks = [tick for i, seg in enumerate(segs) for tick in _ticks(seg, i == 0)]
    return Drawing(WIDTH, axis_y + 44, axis_y, segs, ticks, markers, bands,
                   segs[0].x1 + 9 if len(segs) > 1 else None, _label_xs(bands))


def _label_xs(bands: list[tuple[float, float, str, str]]) -> list[float]:
    """Where each band's label starts: at its band, but never over the previous label."""
    out: list[float] = []
    previous = ""
    for x0, _, _, label in bands:
        out.append(max(x0 + 4, out[-1] + 7 * len(previous) + 12) if out else x0 + 4)
        previous = label
    return out
