"""URL options and password redaction (``sagakit.transport._url``): no services needed."""

from __future__ import annotations

from typing import Any

import pytest

from sagakit.errors import ConfigurationError
from sagakit.transport import redact
from sagakit.transport._url import Option, flag, parse_url, seconds, text

SPEC: dict[str, Option[Any]] = {
    "prefix": Option(text, "sagakit"),
    "lease": Option(seconds, 30.0),
    "sync": Option(flag, True),
    "window": Option(seconds, None),
}


# -- options -----------------------------------------------------------------


def test_defaults_when_the_query_is_empty() -> None:
    parsed = parse_url("nats://h:4222", SPEC)
    assert parsed.base == "nats://h:4222"
    assert parsed.values == {"prefix": "sagakit", "lease": 30.0, "sync": True, "window": None}


def test_query_values_are_typed_and_taken_out_of_the_url() -> None:
    parsed = parse_url("redis://h:6379/0?prefix=app%2Ex&lease=2.5&sync=off", SPEC)
    assert parsed.base == "redis://h:6379/0"
    assert parsed.values == {"prefix": "app.x", "lease": 2.5, "sync": False, "window": None}


def test_explicit_keywords_win_but_none_means_not_given() -> None:
    parsed = parse_url("x://h?lease=2&prefix=q", SPEC, given={"lease": 7.0, "prefix": None})
    assert parsed.values["lease"] == 7.0
    assert parsed.values["prefix"] == "q"


def test_foreign_options_stay_in_the_url_verbatim() -> None:
    url = "redis://h/0?socket_timeout=0.5&lease=1&ssl_ca_certs=%2Fetc%2Fca.pem#frag"
    parsed = parse_url(url, SPEC, foreign={"socket_timeout", "ssl_ca_certs"})
    assert parsed.base == "redis://h/0?socket_timeout=0.5&ssl_ca_certs=%2Fetc%2Fca.pem#frag"
    assert parsed.values["lease"] == 1.0


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("leese=3", "'leese'"),  # a typo is not silently ignored
        ("lease=soon", "lease"),
        ("lease=-1", "lease"),
        ("lease=nan", "lease"),
        ("lease=", "lease"),
        ("sync=maybe", "sync"),
        ("lease", "'lease'"),  # no value at all
        ("lease=1&lease=2", "'lease'"),  # twice
    ],
)
def test_unknown_or_malformed_options_name_the_option(query: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        parse_url(f"amqp://u:secret@h/?{query}", SPEC)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_url("amqp://u:secret@h/?nope=1", SPEC)
    assert "secret" not in str(info.value) and "u:***@h" in str(info.value)


def test_unknown_explicit_keyword_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'leese'"):
        parse_url("x://h", SPEC, given={"leese": 1.0})


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_flag_true(value: str) -> None:
    assert flag(value) is True


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_flag_false(value: str) -> None:
    assert flag(value) is False


# -- redaction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        (
            "postgresql://app:p%40ss@db/x?sslmode=require",
            "postgresql://app:***@db/x?sslmode=require",
        ),
        ("amqp://u:p@ss@h/vhost", "amqp://u:***@h/vhost"),  # an unescaped @ in the password
        ("nats://tok@h:4222", "nats://***@h:4222"),  # a bare NATS user-info part is a token
        (
            "nats://a:b@h1:1,nats://c:d@h2:2?stream=S",
            "nats://a:***@h1:1,nats://c:***@h2:2?stream=S",
        ),
        ("postgresql://h/db?password=pw&user=me", "postgresql://h/db?password=***&user=me"),
        ("redis://h/0?ssl_password=pw", "redis://h/0?ssl_password=***"),
    ],
)
def test_redact_hides_secrets(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "database",
        "memory://",
        "sqlite:///var/lib/app.db",
        "postgresql://postgres@127.0.0.1:5432/test",  # a user name is not a secret
        "amqp://h:5672/?heartbeat=30",
        "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
    ],
)
def test_redact_leaves_urls_without_secrets_alone(url: str) -> None:
    assert redact(url) == url
