"""The one backoff of every retry loop: exponential, capped, with jitter, reset after a success.

Step n (from 0) is `min(cap, first * 2**n)`; the delay is the step scaled by a random factor in
`[1 - jitter/2, 1 + jitter/2]` (within ±25% for the default 0.5): instances that lost the same
Redis or PostgreSQL at the same moment do not come back in lockstep, while on average they retry
exactly as often as without jitter (so an outage logs no more retry lines than before). A delay
can thus exceed the cap by a quarter (`longest`); a loop that must never wait longer than a bound
takes its cap as bound / 1.25.
"""

from __future__ import annotations

import random

# Seeded once per process (from the OS): a fresh Random() per Backoff would read os.urandom each
# time, and the outcome writer makes one for every batch it writes.
_SHARED = random.Random()


class Backoff:
    def __init__(self, first: float, cap: float, *, jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if not 0 < first <= cap:
            raise ValueError("need 0 < first <= cap")
        if not 0 <= jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or _SHARED
        self._step = first

    def next(self) -> float:
        """The delay before the next try (seconds); each call doubles the step up to the cap."""
        step = self._step
        self._step = min(self.cap, self._step * 2)
        if not self.jitter:
            return step
        return step * (1.0 + self.jitter * (self._rng.random() - 0.5))

    def reset(self) -> None:
        """After a success: the next failure waits `first` again."""
        self._step = self.first

    @property
    def longest(self) -> float:
        """The longest delay `next` can return: the cap with the most jitter."""
        return self.cap * (1.0 + self.jitter / 2)

    @property
    def pending_step(self) -> float:
        """The un-jittered step the next call starts from (for log lines)."""
        return self._step
