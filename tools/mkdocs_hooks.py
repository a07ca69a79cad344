"""MkDocs hooks: pages generated from the code, so they cannot drift from it.

``docs/reference/cli.md`` holds the marker ``<!-- sagakit-cli -->``; it is
replaced, at build time, by every ``sagakit`` subcommand with its usage and
options, read from the argparse parser in ``sagakit.cli`` (and the demo's own
parser). ``render_cli()`` is also what tests/test_docs.py checks.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterator
from typing import Any

CLI_MARKER = "<!-- sagakit-cli -->"
METRICS_MARKER = "<!-- sagakit-metrics -->"
# the docstrings are written with reST roles (:class:`~sagakit.x.Y`) and ``::``
# before a literal block; in the rendered Markdown these become plain code
_ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|exc|obj):<code>(?:~[\w.]*\.)?")
_LITERAL_INTRO = re.compile(r"<p>::</p>\s*|::(?=</p>)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, render_cli())
    if METRICS_MARKER in markdown:
        markdown = markdown.replace(METRICS_MARKER, render_metrics())
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Tidy what the docstrings' reST leaves behind in the API reference."""
    if not page.file.src_uri.startswith("reference/"):
        return html
    html = _ROLE.sub("<code>", html)
    return _LITERAL_INTRO.sub(lambda m: "" if m.group().startswith("<p>") else ":", html)


def render_cli() -> str:
    """The whole ``sagakit`` command tree as Markdown."""
    from sagakit import cli

    top = cli.parser()
    parts = [_section("sagakit", top, "the global options, given before the command", 2)]
    for words, sub, help_ in _walk(top, ["sagakit"]):
        if words == ["sagakit", "demo"]:
            sub = _demo_parser() or sub
        parts.append(_section(" ".join(words), sub, help_, min(len(words), 4)))
    return "\n".join(parts)


def render_metrics() -> str:
    """Every Prometheus metric sagakit registers, read from a fully wired registry."""
    from sagakit import App
    from sagakit.observe.telemetry import Telemetry, register_twophase

    telemetry = Telemetry(tracing=False, metrics=True)
    app = App("memory://")
    app.instrument(telemetry)  # the store-wide gauges
    assert telemetry.metrics is not None
    register_twophase(telemetry.metrics, app)  # registered when an App has 2PC resources
    collectors = {id(c): c for c in telemetry.metrics.registry._names_to_collectors.values()}
    rows = [_metric_row(c) for c in collectors.values()]
    head = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    return "\n".join(head + sorted(rows)) + "\n"


def _metric_row(collector: Any) -> str:
    kind = collector._type
    name = collector._name + ("_total" if kind == "counter" else "")
    labels = ", ".join(f"`{label}`" for label in collector._labelnames)
    return f"| `{name}` | {kind} | {labels} | {_cell(collector._documentation)} |"


def _demo_parser() -> argparse.ArgumentParser | None:
    try:
        demo = importlib.import_module("sagakit.examples.order_fulfillment.demo")
    except ModuleNotFoundError:  # without the demo extra: the stub parser is all there is
        return None
    parser: argparse.ArgumentParser = demo.parser()
    return parser


def _walk(
    parser: argparse.ArgumentParser, words: list[str]
) -> Iterator[tuple[list[str], argparse.ArgumentParser, str]]:
    """Every subcommand below ``parser``, depth first, with its one-line help."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            yield [*words, name], sub, helps.get(name, "")
            yield from _walk(sub, [*words, name])


def _section(title: str, parser: argparse.ArgumentParser, help_: str, level: int) -> str:
    lines = [f"{'#' * level} `{title}`", ""]
    if help_:
        lines += [help_[0].upper() + help_[1:] + ".", ""]
    if parser.description and title != "sagakit":
        lines += [parser.description, ""]
    usage = " ".join(parser.format_usage().split())
    lines += ["```text", usage.removeprefix("usage: "), "```", ""]
    rows = [_row(a) for a in parser._actions if _shown(a)]
    if rows:
        lines += ["| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(lines)


def _shown(action: argparse.Action) -> bool:
    hidden = action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)
    return not hidden and not isinstance(action, argparse._SubParsersAction)


def _row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(action.option_strings)
        if action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
    else:
        name = str(action.metavar or action.dest)
    help_ = (action.help or "") % {"default": action.default, "prog": "sagakit"}
    if action.choices and not isinstance(action.choices, dict):
        help_ += f" (one of: {', '.join(map(str, action.choices))})"
    if action.required and action.option_strings:
        help_ += " (required)"
    return f"| `{name}` | {_cell(help_)} |"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
