"""Draw a process manager from its definition: states, transitions, timers.

The drawing is made from the handlers' ``when=`` and ``to=`` declarations
(:func:`sagakit.process.check.edges`), so it cannot drift from the code::

    python -m sagakit.process.diagram sagakit.examples.checkout:checkout > docs/checkout-process.svg

States are placed in rows by their distance from the start (so
compensations, which lead back, point upwards), final states in the last row
with a double border. An arrow is labelled with what moves the instance: a
message type, ``reply to`` a command, or a timer (``timer name``). A handler
that keeps the state is drawn as a loop on its box.
"""

from __future__ import annotations

import importlib
import sys
from html import escape
from typing import Any

from .check import edges
from .definition import Handler, ProcessManager

BOX_W, BOX_H, COL, ROW, TOP, MARGIN = 190, 40, 260, 120, 70, 200
FONT = "font-family='Helvetica, Arial, sans-serif'"


def label(h: Handler) -> str:
    """How a transition's trigger reads on the drawing."""
    short = h.trigger.rsplit(".", 1)[-1]
    return {"timer": f"timer {h.trigger}", "reply": f"reply to {short}"}.get(h.kind, short)


def layers(pm: ProcessManager[Any]) -> list[list[str]]:
    """States in rows by distance from the start (unreachable ones last)."""
    es, rows, placed = edges(pm), [], set()
    row = sorted({t for s, t, _ in es if s is None})
    while row:
        rows.append(row)
        placed |= set(row)
        row = sorted({t for s, t, _ in es if s in row and t not in placed})
    rest = [s for s in pm.states if s not in placed]
    rows = [[s for s in r if s not in pm.final] for r in rows + ([rest] if rest else [])]
    finals = [s for s in pm.states if s in pm.final]
    return [r for r in rows if r] + ([finals] if finals else [])


def render(pm: ProcessManager[Any]) -> str:
    """The SVG drawing of ``pm``."""
    rows = layers(pm)
    width = max(len(r) for r in rows) * COL + 40 + MARGIN
    pos: dict[str, tuple[float, float]] = {
        s: (
            20 + (width - 40 - MARGIN - len(r) * COL) / 2 + i * COL + (COL - BOX_W) / 2,
            TOP + j * ROW,
        )
        for j, r in enumerate(rows)
        for i, s in enumerate(r)
    }
    height = TOP + len(rows) * ROW
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height}' "
        f"viewBox='0 0 {width:.0f} {height}' {FONT} font-size='12'>",
        "<defs><marker id='a' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' "
        "markerHeight='7' orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='#555'/></marker></defs>",
        f"<text x='20' y='28' font-size='16' font-weight='bold'>{escape(pm.name)} "
        f"(version {pm.version})</text>",
    ]
    parts += _arrows(pm, pos) + [_box(s, *pos[s], s in pm.final) for s in pos]
    return "\n".join([*parts, "</svg>", ""])


def _box(state: str, x: float, y: float, final: bool) -> str:
    inner = (
        f"<rect x='{x + 3:.0f}' y='{y + 3}' width='{BOX_W - 6}' height='{BOX_H - 6}' rx='6' "
        "fill='none' stroke='#2f9e57'/>"
        if final
        else ""
    )
    stroke = "#2f9e57" if final else "#3b6fd8"
    return (
        f"<rect x='{x:.0f}' y='{y}' width='{BOX_W}' height='{BOX_H}' rx='8' fill='#f4f7fd' "
        f"stroke='{stroke}' stroke-width='1.5'/>{inner}<text x='{x + BOX_W / 2:.0f}' "
        f"y='{y + 25}' text-anchor='middle'>{escape(state)}</text>"
    )


def _arrows(pm: ProcessManager[Any], pos: dict[str, tuple[float, float]]) -> list[str]:
    grouped: dict[tuple[str | None, str], list[str]] = {}
    for src, dst, h in edges(pm):
        if dst in pos and (src is None or src in pos):
            grouped.setdefault((src, dst), []).append(label(h))
    out = []
    for (src, dst), names in grouped.items():
        text = sorted(set(names))
        out.append(_loop(pos[dst], text) if src == dst else _line(pos, src, dst, text))
    return out


def _line(pos: dict[str, tuple[float, float]], src: str | None, dst: str, names: list[str]) -> str:
    x2, y2 = pos[dst][0] + BOX_W / 2, pos[dst][1]
    x1, y1 = (x2, 40.0) if src is None else (pos[src][0] + BOX_W / 2, pos[src][1] + BOX_H)
    if src is not None and y2 <= y1:  # back or sideways: from the side
        y1, y2 = pos[src][1] + BOX_H / 2, pos[dst][1] + BOX_H / 2
    mx, my = (x1 + x2) / 2 + 6, (y1 + y2) / 2 - 7 * (len(names) - 1)
    lines = "".join(
        f"<tspan x='{mx:.0f}' dy='{0 if i == 0 else 14}'>{escape(n)}</tspan>"
        for i, n in enumerate(names)
    )
    return (
        f"<line x1='{x1:.0f}' y1='{y1:.0f}' x2='{x2:.0f}' y2='{y2:.0f}' stroke='#555' "
        f"marker-end='url(#a)'/><text x='{mx:.0f}' y='{my:.0f}' fill='#333'>{lines}</text>"
    )


def _loop(at: tuple[float, float], names: list[str]) -> str:
    x, y = at
    return (
        f"<path d='M{x + BOX_W - 30:.0f},{y} c10,-22 34,-22 30,8' fill='none' stroke='#999' "
        f"marker-end='url(#a)'/><text x='{x + BOX_W + 6:.0f}' y='{y - 4}' fill='#777' "
        f"font-size='11'>{escape(', '.join(names))}</text>"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: python -m sagakit.process.diagram MODULE:PROCESS_MANAGER", file=sys.stderr)
        return 2
    module, name = argv[0].split(":", 1)
    sys.stdout.write(render(getattr(importlib.import_module(module), name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
