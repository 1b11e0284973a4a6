"""Progress for long work: a tqdm bar when stderr is a terminal, quiet iteration with debug lines
elsewhere (logs and CI stay one line per step)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on a TTY, otherwise with one debug line per item."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    for i, item in enumerate(items):
        logger.debug("%s: %d/%s", desc, i + 1, total if total is not None else "?")
        yield item
