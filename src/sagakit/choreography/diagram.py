"""Draw a choreography contract as SVG: services as lanes, events as arrows.

Drawn from the :class:`~.contract.ChoreographyDefinition` itself, so it
cannot drift from the code::

    python -m sagakit.choreography.diagram \\
        sagakit.examples.order_fulfillment.choreography:place_order > docs/place-order.svg

Each event sits in the lane of the service that publishes it (by default the
first part of its registered name, ``customers`` for
``customers.events.CreditReleased``) and in the column of its step, time
running left to right. Solid arrows are the forward path, red ones the
failure events, dashed orange ones the compensations a failure triggers.
"""

from __future__ import annotations

import sys
from html import escape

from .contract import ChoreographyDefinition

COL, LANE, X0, Y0 = 190, 100, 130, 70
BOX_W, BOX_H = 168, 38
FONT = "font-family='Helvetica, Arial, sans-serif'"
KINDS = {
    "start": ("#eef1f5", "#4a5568"),
    "done": ("#e8f0fe", "#3b6fd8"),
    "pivot": ("#fff1e0", "#d9822b"),
    "failed": ("#fdecea", "#c94a3f"),
    "undone": ("#fff7e6", "#d97706"),
    "completion": ("#e6f4ea", "#2f9e57"),
}


def lane_of(event: str) -> str:
    """The service publishing ``event``: the first part of its name."""
    return event.split(".", 1)[0]


def layout(defn: ChoreographyDefinition) -> dict[str, tuple[int, str]]:
    """event -> (column, kind)."""
    spots: dict[str, tuple[int, str]] = {defn.start: (0, "start")}
    for s in defn.steps:
        kind = "pivot" if s.name == defn.pivot else "done"
        spots[s.done] = (s.index + 1, kind)
        if s.failed:
            spots[s.failed] = (s.index + 1, "failed")
    after = len(defn.steps) + 1
    for i, u in enumerate(defn.undos):
        spots[u.done] = (after + i, "undone")
        if u.failed:
            spots[u.failed] = (after + i, "failed")
    last = after + len(defn.undos)
    for c in defn.completions:
        spots[c] = (last, "completion")
    return spots


def arrows(defn: ChoreographyDefinition) -> list[tuple[str, str, str]]:
    """(from event, to event, style): forward, failure and compensation arrows."""
    out, previous = [], defn.start
    for s in defn.steps:
        out.append((previous, s.done, "forward"))
        if s.failed:
            out.append((previous, s.failed, "failure"))
        previous = s.done
    for u in defn.undos:
        out += [(failure, u.done, "compensation") for failure in u.on]
    if defn.completions:
        out.append((previous, defn.completions[0], "forward"))
    return out


def render(defn: ChoreographyDefinition) -> str:
    """The SVG of ``defn``."""
    spots = layout(defn)
    lanes = list(dict.fromkeys(lane_of(e) for e in sorted(spots, key=lambda e: spots[e][0])))
    rows = _rows(spots, lanes)
    width = X0 + COL * (max(c for c, _ in spots.values()) + 1)
    height = Y0 + LANE * len(lanes) + 40
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>",
        _defs(),
        f"<text x='20' y='32' {FONT} font-size='18' font-weight='bold'>"
        f"choreography {escape(defn.name)}</text>",
        f"<text x='20' y='52' {FONT} font-size='12' fill='#555'>services as lanes; "
        "solid: forward, red: failure, dashed: compensation</text>",
    ]
    parts += _lanes(lanes, width)
    parts += [_arrow(spots, rows, a, b, style) for a, b, style in arrows(defn)]
    parts += [_box(e, col, rows[e], kind) for e, (col, kind) in spots.items()]
    return "\n".join([*parts, "</svg>", ""])


def _rows(spots: dict[str, tuple[int, str]], lanes: list[str]) -> dict[str, float]:
    """The y of each event: its lane; a second event in one lane and column goes below."""
    taken: dict[tuple[int, str], int] = {}
    rows: dict[str, float] = {}
    for event, (col, _) in spots.items():
        lane = lane_of(event)
        n = taken[(col, lane)] = taken.get((col, lane), -1) + 1
        rows[event] = Y0 + LANE * lanes.index(lane) + 6 + (BOX_H + 8) * min(n, 1)
    return rows


def _defs() -> str:
    marks = [
        f"<marker id='{name}' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' "
        f"markerHeight='7' orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='{color}'/></marker>"
        for name, color in (("fwd", "#3b6fd8"), ("fail", "#c94a3f"), ("comp", "#d97706"))
    ]
    return "<defs>" + "".join(marks) + "</defs>"


def _lanes(lanes: list[str], width: int) -> list[str]:
    out = []
    for i, lane in enumerate(lanes):
        y = Y0 + LANE * i
        fill = "#fafafa" if i % 2 else "#f3f4f6"
        out.append(f"<rect x='0' y='{y}' width='{width}' height='{LANE}' fill='{fill}'/>")
        out.append(
            f"<text x='16' y='{y + LANE / 2 + 5}' {FONT} font-size='13' font-weight='bold' "
            f"fill='#333'>{escape(lane)}</text>"
        )
    return out


def _box(event: str, col: int, y: float, kind: str) -> str:
    fill, stroke = KINDS[kind]
    x = X0 + COL * col
    label = event.rsplit(".", 1)[-1]
    extra = " (pivot)" if kind == "pivot" else ""
    return (
        f"<g><title>{escape(event)}</title>"
        f"<rect x='{x}' y='{y}' width='{BOX_W}' height='{BOX_H}' rx='6' fill='{fill}' "
        f"stroke='{stroke}' stroke-width='1.5'/>"
        f"<text x='{x + BOX_W / 2}' y='{y + 24}' {FONT} font-size='12' text-anchor='middle'>"
        f"{escape(label)}{extra}</text></g>"
    )


def _arrow(
    spots: dict[str, tuple[int, str]], rows: dict[str, float], a: str, b: str, style: str
) -> str:
    x1: float = X0 + COL * spots[a][0] + BOX_W
    x2: float = X0 + COL * spots[b][0]
    y1, y2 = rows[a] + BOX_H / 2, rows[b] + BOX_H / 2
    if x2 <= x1:  # same column: leave from the bottom
        x1, y1 = x1 - BOX_W / 2, rows[a] + BOX_H
    color, mark, dash = {
        "forward": ("#3b6fd8", "fwd", ""),
        "failure": ("#c94a3f", "fail", ""),
        "compensation": ("#d97706", "comp", " stroke-dasharray='6 4'"),
    }[style]
    mid = (x1 + x2) / 2
    return (
        f"<path d='M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}' fill='none' stroke='{color}' "
        f"stroke-width='1.6'{dash} marker-end='url(#{mark})'><title>{escape(a)} → "
        f"{escape(b)}</title></path>"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m sagakit.choreography.diagram MODULE:CONTRACT``: print the SVG."""
    import importlib

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or ":" not in args[0]:
        print("usage: python -m sagakit.choreography.diagram MODULE:CONTRACT", file=sys.stderr)
        return 2
    module, _, attr = args[0].partition(":")
    defn = getattr(importlib.import_module(module), attr)
    sys.stdout.write(render(defn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
