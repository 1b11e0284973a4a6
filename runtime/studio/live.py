"""Live re-rendering: per-page request tokens, so a newer request supersedes the one in flight.

Every render request of a page first takes a token (``mark``: a quick event outside the render queue,
so it lands even while every render slot is busy); the render then carries that token. A live render
(the drawing changed) waits ``debounce`` seconds and renders only while its token is still the page's
newest; during the denoising loop it keeps checking, so a newer request stops it at the next step and
frees its slot. A render the user asked for with the button is never stopped, but it still supersedes
live renders in flight (it takes a token too).

    live = LiveRequests()
    token = live.mark(session)                     # on every change / click, at once
    if live.settle(session, token, debounce=0.3):  # in the render handler
        studio.render(inputs, superseded=lambda: not live.is_newest(session, token))
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict

DEBOUNCE_S = 0.35


class LiveRequests:
    """The newest request token per page (session), for at most ``max_sessions`` recent pages."""

    def __init__(self, max_sessions: int = 4096):
        self._newest: OrderedDict[str, int] = OrderedDict()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._max = max_sessions

    def mark(self, session: str) -> int:
        """A new request from ``session``: its token, now the session's newest."""
        with self._lock:
            token = next(self._tokens)
            self._newest[session] = token
            self._newest.move_to_end(session)
            while len(self._newest) > self._max:
                self._newest.popitem(last=False)
            return token

    def is_newest(self, session: str, token: int) -> bool:
        """False once a newer request of ``session`` was marked (a forgotten session counts as newest)."""
        with self._lock:
            return self._newest.get(session, token) <= token

    def settle(self, session: str, token: int, debounce: float = DEBOUNCE_S, poll: float = 0.02) -> bool:
        """Wait ``debounce`` seconds; False as soon as a newer request of the session arrives."""
        deadline = time.monotonic() + debounce
        while True:
            if not self.is_newest(session, token):
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(poll, left))
