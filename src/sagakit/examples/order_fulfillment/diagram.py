"""Draw a saga definition as SVG: its steps, their compensations, the pivot.

The picture is generated from the :class:`~sagakit.SagaDefinition` object
itself, so it cannot drift from the code::

    python -m sagakit.examples.order_fulfillment.diagram > docs/create-order.svg

Forward steps run down the left column. A compensatable step has its
compensation on the right; a failure before the pivot runs the compensations
of the completed steps upwards, in reverse order. Below the pivot every step
is retried until it succeeds.
"""

from __future__ import annotations

import itertools
import sys
import typing
from html import escape
from typing import Any

import msgspec

import sagakit as sk
from sagakit.saga import SagaDefinition, StepDef

W = 860
X_STEP, W_STEP = 40, 390
X_COMP, W_COMP = 560, 260
Y0, H, GAP = 150, 62, 30
COLORS = {
    "compensatable": ("#e8f0fe", "#3b6fd8"),
    "pivot": ("#fff1e0", "#d9822b"),
    "retriable": ("#e6f4ea", "#2f9e57"),
    "compensation": ("#fdecea", "#c94a3f"),
}
FONT = "font-family='Helvetica, Arial, sans-serif'"


def command_name(defn: SagaDefinition[Any], action: Any) -> str:
    """The registered name of the command an action sends, from sample data."""
    try:
        return sk.messages.spec_of(type(action.factory(sample(defn.data_type)))).name
    except Exception:
        return f"a command to {action.participant}"


def sample(cls: type[Any]) -> Any:
    """An instance of a Struct data type with neutral values in required fields."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in msgspec.structs.fields(cls):
        if f.required:
            values[f.name] = _neutral(hints[f.name])
    return cls(**values)


def _neutral(tp: Any) -> Any:
    origin = typing.get_origin(tp) or tp
    for kind, value in ((str, ""), (bool, False), (int, 0), (float, 0.0)):
        if origin is kind:
            return value
    if origin in (list, tuple, set):
        return origin()
    if origin is dict:
        return {}
    return None


def _text(x: float, y: float, s: str, size: int = 13, weight: str = "normal", **kw: str) -> str:
    attrs = "".join(f" {k.replace('_', '-')}='{v}'" for k, v in kw.items())
    return (
        f"<text x='{x}' y='{y}' font-size='{size}' font-weight='{weight}' {FONT}{attrs}>"
        f"{escape(s)}</text>"
    )


def _box(x: float, y: float, w: float, kind: str, lines: list[tuple[str, int, str]]) -> str:
    fill, stroke = COLORS[kind]
    width = 3 if kind == "pivot" else 1.5
    out = [
        f"<rect x='{x}' y='{y}' width='{w}' height='{H}' rx='8' fill='{fill}' "
        f"stroke='{stroke}' stroke-width='{width}'/>"
    ]
    for i, (s, size, weight) in enumerate(lines):
        out.append(_text(x + 12, y + 20 + i * 17, s, size, weight, fill="#1f2328"))
    return "\n".join(out)


def _arrow(x1: float, y1: float, x2: float, y2: float, color: str, dashed: bool = False) -> str:
    dash = " stroke-dasharray='6 4'" if dashed else ""
    marker = "red" if color == COLORS["compensation"][1] else "grey"
    return (
        f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='{color}' stroke-width='1.8'"
        f"{dash} marker-end='url(#{marker})'/>"
    )


def _describe(step: StepDef) -> str:
    if step.kind == "pivot":
        return "PIVOT: point of no return"
    if step.kind == "retriable":
        policy = step.retry
        n = "for ever" if policy is None or policy.max_attempts is None else policy.max_attempts
        text = f"retriable: up to {n} attempts" if isinstance(n, int) else "retried for ever"
        return text + (f", backoff {policy.initial:g}s..{policy.max_delay:g}s" if policy else "")
    return "compensatable" + (f", timeout {step.timeout:g}s" if step.timeout else "")


def render(defn: SagaDefinition[Any]) -> str:
    """The SVG document for ``defn``."""
    steps = list(defn.steps)
    rows = {s.name: i for i, s in enumerate(steps)}
    y_of = {s.name: Y0 + i * (H + GAP) for i, s in enumerate(steps)}
    height = Y0 + len(steps) * (H + GAP) + 40
    red, grey = COLORS["compensation"][1], "#57606a"
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{height}' "
        f"viewBox='0 0 {W} {height}'>",
        "<defs>",
        *(
            f"<marker id='{name}' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' "
            f"markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' "
            f"fill='{color}'/></marker>"
            for name, color in (("grey", grey), ("red", red))
        ),
        "</defs>",
        f"<rect width='{W}' height='{height}' fill='white'/>",
        _text(X_STEP, 38, f"saga {defn.name!r} (version {defn.version})", 20, "bold"),
        _text(
            X_STEP,
            62,
            f"data: {defn.data_type.__name__} · generated from the definition by "
            "sagakit.examples.order_fulfillment.diagram",
            12,
            fill=grey,
        ),
        _text(X_STEP, Y0 - 48, "forward steps (command → participant)", 13, "bold", fill=grey),
        _text(X_COMP, Y0 - 48, "compensations (run bottom-up)", 13, "bold", fill=red),
    ]
    pivot_seen = False
    for i, step in enumerate(steps):
        y = y_of[step.name]
        if step.action is not None:
            what = f"{command_name(defn, step.action)} → {step.action.participant}"
        else:
            what = "local function in the coordinator"
        title = f"{i + 1}. {step.name}"
        out.append(
            _box(
                X_STEP,
                y,
                W_STEP,
                step.kind,
                [(title, 14, "bold"), (what, 12, "normal"), (_describe(step), 11, "normal")],
            )
        )
        if i + 1 < len(steps):
            out.append(_arrow(X_STEP + 60, y + H, X_STEP + 60, y + H + GAP - 2, grey))
        if step.compensation is not None:
            name = command_name(defn, step.compensation)
            out.append(
                _box(
                    X_COMP,
                    y,
                    W_COMP,
                    "compensation",
                    [
                        (f"undo {step.name}", 13, "bold"),
                        (f"{name} → {step.compensation.participant}", 12, "normal"),
                        ("retried until done; idempotent", 11, "normal"),
                    ],
                )
            )
        if step.kind in ("compensatable", "pivot") and not pivot_seen:
            # A failure here compensates the completed steps above, upwards.
            done = [s for s in steps[: rows[step.name]] if s.compensation is not None]
            if done:
                target = y_of[done[-1].name] + H / 2
                out.append(
                    _arrow(X_STEP + W_STEP, y + H / 2, X_COMP - 4, target + 8, red, dashed=True)
                )
                out.append(
                    _text(X_STEP + W_STEP + 8, y + H / 2 + 16, "fails", 11, fill=red),
                )
        if step.kind == "pivot":
            pivot_seen = True
            line_y = y + H + GAP / 2
            out.append(
                f"<line x1='20' y1='{line_y}' x2='{W - 20}' y2='{line_y}' stroke='#d9822b' "
                "stroke-width='1.5' stroke-dasharray='2 4'/>"
            )
            out.append(
                _text(
                    X_STEP + 80,
                    line_y - 4,
                    "after the pivot: no compensation, failures are retried forward",
                    11,
                    fill="#d9822b",
                )
            )
    comps = [s for s in steps if s.compensation is not None]
    for upper, lower in itertools.pairwise(comps):
        x = X_COMP + W_COMP / 2
        out.append(_arrow(x, y_of[lower.name], x, y_of[upper.name] + H + 2, red))
    if comps:
        top = y_of[comps[0].name]
        x = X_COMP + W_COMP / 2
        out.append(_arrow(x, top, x, Y0 - 30, red))
        out.append(_text(x + 10, Y0 - 16, "saga compensated", 12, "bold", fill=red))
    last = y_of[steps[-1].name] + H
    out.append(_arrow(X_STEP + 60, last, X_STEP + 60, last + 26, grey))
    out.append(_text(X_STEP + 70, last + 24, "completed", 13, "bold", fill=COLORS["retriable"][1]))
    legend_x = X_COMP
    for j, (kind, label) in enumerate(
        [("compensatable", "compensatable"), ("pivot", "pivot"), ("retriable", "retriable")]
    ):
        fill, stroke = COLORS[kind]
        ly = last - 40 + j * 22
        out.append(
            f"<rect x='{legend_x}' y='{ly}' width='16' height='14' rx='3' fill='{fill}' "
            f"stroke='{stroke}'/>"
        )
        out.append(_text(legend_x + 24, ly + 12, label, 12))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    from .saga import create_order

    sys.stdout.write(render(create_order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
