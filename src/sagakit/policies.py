"""Small frozen option objects: retry and backoff."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how fast to retry. ``max_attempts=None`` retries forever.

    The delay before attempt ``n + 1`` is ``initial * multiplier ** (n - 1)``,
    capped at ``max_delay``, with up to ``jitter`` of it added at random.
    """

    max_attempts: int | None = 5
    initial: float = 0.05
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1 (or None for forever)")
        if self.initial < 0 or self.multiplier < 1 or self.max_delay < 0:
            raise ConfigurationError("delays must be non-negative and the multiplier at least 1")

    def gives_up_after(self, attempt: int) -> bool:
        """True if no attempt should follow attempt number ``attempt`` (1-based)."""
        return self.max_attempts is not None and attempt >= self.max_attempts

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one.

        The exponent is capped where the delay reaches ``max_delay``, so a step
        retried for ever (attempt 10**6 and beyond) never overflows.
        """
        steps = min(max(0, attempt - 1), self._steps_to_max())
        base = min(self.max_delay, self.initial * self.multiplier**steps)
        return base * (1 + self.jitter * random.random())

    def _steps_to_max(self) -> int:
        """How many doublings (multiplications) take ``initial`` past ``max_delay``."""
        if self.initial <= 0 or self.multiplier <= 1:
            return 0  # the delay never grows
        ratio = max(self.max_delay / self.initial, 1.0)
        return int(math.log(ratio, self.multiplier)) + 1

    @classmethod
    def forever(cls, initial: float = 0.05, max_delay: float = 30.0) -> RetryPolicy:
        return cls(max_attempts=None, initial=initial, max_delay=max_delay)


NO_RETRY = RetryPolicy(max_attempts=1)
