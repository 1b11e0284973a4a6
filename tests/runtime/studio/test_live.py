"""Live re-rendering tokens: the newest request of a page wins; other pages are not affected."""

from __future__ import annotations

import threading
import time

from sdkiln.runtime.studio.live import LiveRequests


def test_newer_request_supersedes_only_its_own_page() -> None:
    live = LiveRequests()
    a1 = live.mark("page-a")
    b1 = live.mark("page-b")
    assert live.is_newest("page-a", a1) and live.is_newest("page-b", b1)
    a2 = live.mark("page-a")
    assert a2 > a1
    assert not live.is_newest("page-a", a1) and live.is_newest("page-a", a2)
    assert live.is_newest("page-b", b1)


def test_settle_waits_out_the_debounce_when_nothing_newer_comes() -> None:
    live = LiveRequests()
    token = live.mark("p")
    t0 = time.monotonic()
    assert live.settle("p", token, debounce=0.2)
    assert time.monotonic() - t0 >= 0.2


def test_settle_gives_up_as_soon_as_a_newer_request_arrives() -> None:
    live = LiveRequests()
    token = live.mark("p")
    threading.Timer(0.05, live.mark, args=("p",)).start()
    t0 = time.monotonic()
    assert not live.settle("p", token, debounce=5.0)
    assert time.monotonic() - t0 < 1.0


def test_a_forgotten_page_counts_as_newest() -> None:
    live = LiveRequests(max_sessions=2)
    old = live.mark("p1")
    live.mark("p2")
    live.mark("p3")  # p1 is forgotten: its request must still be allowed to finish
    assert live.is_newest("p1", old)
