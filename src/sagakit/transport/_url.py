"""Transport URLs: typed query-string options, and passwords kept out of messages.

A broker URL carries the transport's own options in its query string
(``nats://host:4222?stream=ORDERS&ack_wait=60``). :func:`parse_url` reads them
against a declared spec, so a misspelt option or a bad value fails at start-up
naming the option instead of being silently ignored. :func:`redact` is the one
way to put a URL into an error message, a log line or a printout.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote_plus, unquote_plus

from ..errors import ConfigurationError, ForeignNamespace

T = TypeVar("T")

HIDDEN = "***"

DEFAULT_NAMESPACE = "sagakit"
MAX_NAMESPACE = 64
# Dot-separated words of [A-Za-z0-9_-]: valid in RabbitMQ names, NATS subjects and Redis keys.
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# A bare user-info part is a secret token in these schemes (NATS), not a user name.
_TOKEN_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
# Query parameters whose values are secrets (libpq's ``password``, redis-py's, ...).
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&;#]*(?:password|passwd|secret|token)[^=&;#]*=)[^&;#]*")
# Where one URL of a comma-separated server list (NATS) begins.
_SECRET_VALUE = r"\g<1>" + HIDDEN
_NEXT_URL = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.\-]*://)")


@dataclass(frozen=True, slots=True)
class Option(Generic[T]):
    """One query-string option: how to read its text, and its value when absent."""

    parse: Callable[[str], T]
    default: T


@dataclass(frozen=True, slots=True)
class ParsedUrl:
    """A URL split into the part for the driver and the transport's own options."""

    base: str
    """The URL without the transport's options (driver options kept verbatim)."""
    values: dict[str, Any]
    """Every option of the spec: explicit keyword, else the query, else the default."""


def text(value: str) -> str:
    """A string option, as given."""
    return value


def seconds(value: str) -> float:
    """A finite, non-negative number (a duration in seconds)."""
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("not a finite, non-negative number")
    return number


def flag(value: str) -> bool:
    """A boolean: ``1/true/yes/on`` or ``0/false/no/off``; anything else is a mistake."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("not a boolean (true/false, yes/no, on/off, 1/0)")


def count(value: str) -> int:
    """A whole number, zero or more (a pool size)."""
    number = int(value)
    if number < 0:
        raise ValueError("not a whole number >= 0")
    return number


def namespace(value: str) -> str:
    """A deployment namespace: dot-separated words of letters, digits, ``_`` and ``-``.

    Narrow on purpose, so one namespace is a valid part of a RabbitMQ queue
    name, of NATS subjects and stream names, and of Redis keys alike.
    """
    if len(value) > MAX_NAMESPACE or not _NAMESPACE.fullmatch(value):
        raise ValueError(
            f"a namespace is up to {MAX_NAMESPACE} letters, digits, '_' or '-',"
            " in words separated by single dots"
        )
    return value


def pick_namespace(chosen: str | None, alias: str | None = None) -> str:
    """The namespace from ``chosen``, or from an older option name (``prefix``).

    Both set to different values is a mistake, not a choice to make silently.
    """
    if chosen is not None and alias is not None and chosen != alias:
        raise ConfigurationError(f"namespace {chosen!r} and prefix {alias!r} disagree; set one")
    value = chosen if chosen is not None else alias
    try:
        return namespace(DEFAULT_NAMESPACE if value is None else value)
    except ValueError as exc:
        raise ConfigurationError(f"bad namespace {value!r}: {exc}") from None


def require_own(mine: str, asked: str) -> None:
    """Refuse (:class:`~sagakit.errors.ForeignNamespace`) to remove ``asked`` if not ``mine``."""
    if asked != mine:
        raise ForeignNamespace(
            f"refusing to remove namespace {asked!r}: this transport's namespace is {mine!r}"
        )


def require_inside(name: str, start: str) -> str:
    """``name`` if it begins with ``start`` (its namespace's own); else refuse."""
    if not name.startswith(start):
        raise ForeignNamespace(f"refusing to remove {name!r}: it is not under {start!r}")
    return name


def fresh_namespace(label: str = "run") -> str:
    """A namespace no earlier run used: test runs and the demo start from empty queues."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


def with_option(url: str, name: str, value: str) -> str:
    """``url`` with ``name=value`` added to its query, unless the query sets it already."""
    if has_option(url, name):
        return url
    head, hash_, fragment = url.partition("#")
    sep = "&" if "?" in head else "?"
    return f"{head}{sep}{quote_plus(name)}={quote_plus(value)}{hash_}{fragment}"


def parse_url(
    url: str,
    spec: Mapping[str, Option[Any]],
    *,
    given: Mapping[str, Any] | None = None,
    foreign: Collection[str] = (),
) -> ParsedUrl:
    """Read the options of ``spec`` from ``url``'s query string.

    ``given`` holds explicit keyword arguments; those that are not None win
    over the query. Names in ``foreign`` belong to the driver and stay in
    :attr:`ParsedUrl.base`. Any other name, a repeated option or a value its
    parser refuses raises :class:`ConfigurationError` naming the option.
    """
    head, _, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    found: dict[str, Any] = {}
    kept: list[str] = []
    for pair in filter(None, query.split("&")):
        name, raw = _split_pair(pair, url)
        if name in foreign and name not in spec:
            kept.append(pair)
            continue
        if name not in spec:
            raise ConfigurationError(
                f"unknown URL option {name!r} in {redact(url)}; {_valid(spec, foreign)}"
            )
        if name in found:
            raise ConfigurationError(f"URL option {name!r} given twice in {redact(url)}")
        found[name] = _read(spec[name], name, raw, url)
    values = {name: found.get(name, option.default) for name, option in spec.items()}
    values.update(_explicit(spec, given or {}))
    base = head + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return ParsedUrl(base, values)


def _valid(spec: Mapping[str, Option[Any]], foreign: Collection[str]) -> str:
    """The valid option names, for an error message."""
    valid = f"valid options: {', '.join(sorted(spec))}"
    others = sorted(set(foreign) - set(spec))
    return valid + (f"; and the driver's: {', '.join(others)}" if others else "")


def _split_pair(pair: str, url: str) -> tuple[str, str]:
    name, eq, raw = pair.partition("=")
    if not eq:
        raise ConfigurationError(f"URL option {unquote_plus(name)!r} has no value in {redact(url)}")
    return unquote_plus(name), unquote_plus(raw)


def _read(option: Option[Any], name: str, raw: str, url: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigurationError(f"bad URL option {name}={raw!r} in {redact(url)}: {exc}") from None


def _explicit(spec: Mapping[str, Option[Any]], given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigurationError(f"unknown option {unknown[0]!r} ({', '.join(sorted(spec))})")
    return {name: value for name, value in given.items() if value is not None}


def has_option(url: str, *names: str) -> bool:
    """Whether the URL's query string sets any of ``names``."""
    query = url.partition("?")[2].partition("#")[0]
    given = {pair.partition("=")[0] for pair in re.split(r"[&;]", query) if pair}
    return not given.isdisjoint(names)


def redact(url: str) -> str:
    """``url`` with its password (or token) and secret query values replaced by ``***``.

    Handles comma-separated server lists (NATS) and strings that are not
    URLs at all (returned as they are), so any configured address can go
    through it before it is shown.
    """
    return ",".join(_redact_one(part) for part in _NEXT_URL.split(url))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    if at:
        netloc = _hide_password(userinfo, scheme.lower()) + "@" + host
    return f"{scheme}{sep}{netloc}{_SECRET_PARAM.sub(_SECRET_VALUE, tail)}"


def _hide_password(userinfo: str, scheme: str) -> str:
    user, colon, password = userinfo.partition(":")
    if colon:
        return f"{user}:{HIDDEN}" if password else userinfo
    return HIDDEN if scheme in _TOKEN_SCHEMES and user else userinfo


__all__ = [
    "DEFAULT_NAMESPACE",
    "Option",
    "ParsedUrl",
    "count",
    "flag",
    "fresh_namespace",
    "namespace",
    "parse_url",
    "pick_namespace",
    "redact",
    "require_inside",
    "require_own",
    "seconds",
    "text",
    "with_option",
]
