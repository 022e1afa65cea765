"""A way of sending that an executor stops using for a while after it went unanswered.

Direct reports (`reporting.DirectReports`) and requests to a session's owner
(`routing.Addressing`) both fall back to another path when the planner does not answer in time:
an overloaded or unreachable planner, or NATS permissions that drop the request. Waiting out a
timeout on every request would stall them all, so after one the path is left alone for `pause`
seconds.
"""

from __future__ import annotations

import time


class Pause:
    """Whether a way of sending is used now: not for `pause` seconds after `timed_out`."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self._off_until = 0.0

    def on(self) -> bool:
        return time.monotonic() >= self._off_until

    def timed_out(self) -> None:
        self._off_until = time.monotonic() + self.pause
