"""The console's options: a small frozen dataclass, explicit, no globals."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigurationError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class ConsoleOptions:
    """How the console listens, whom it trusts and what it allows.

    ``proxy_header`` turns on the trusted reverse-proxy mode: a request from
    an address in ``trusted_proxies`` that carries this header is the user it
    names, with the role in ``proxy_role_header`` (``viewer`` if absent). From
    any other address the headers are ignored.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    #: refuse every action (and audit the refusal); pages and the API still read
    read_only: bool = False
    proxy_header: str | None = None
    proxy_role_header: str = "X-Sagakit-Role"
    trusted_proxies: tuple[str, ...] = ()
    #: the largest request body accepted, in bytes
    max_body: int = 64 * 1024
    #: seconds between the pages' live refreshes
    refresh: float = 5.0
    #: send the session cookie only over HTTPS (set when served behind TLS)
    secure_cookie: bool = False
    #: serve ``/metrics`` without a token (only on a loopback ``host``)
    public_metrics: bool = False
    #: seconds without progress after which ``/metrics`` counts a saga as stuck
    stuck_after: float = 300.0

    def __post_init__(self) -> None:
        if self.proxy_header and not self.trusted_proxies:
            raise ConfigurationError("proxy_header needs trusted_proxies (an allow-list)")
        if self.public_metrics and self.host not in LOOPBACK:
            raise ConfigurationError("public_metrics only on a loopback host (127.0.0.1, ::1)")
        if not 1 <= self.max_body <= 16 * 1024 * 1024:
            raise ConfigurationError("max_body must be between 1 byte and 16 MiB")
