"""Tiles on the cluster: a window of futures kept about twice the cluster's threads deep.

:func:`map_tiles` submits one small graph per tile and, as each one finishes, submits the
next, so every worker thread stays busy and no batch's slowest tile holds the others back
(DESIGN.md "A window of tiles in flight"). The window follows the cluster: its thread count
is re-read as tiles finish (at most once a second), so an adaptive cluster that grows is fed
more tiles and one that shrinks is not flooded. The client holds only the tiles in flight;
what it keeps of their results is the caller's choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, as_completed
from tqdm.auto import tqdm

from popdask.grid import Tile

log = logging.getLogger(__name__)

#: Tiles in flight per worker thread: one running, one waiting on the worker, so a thread
#: never waits on a round trip to the client between two tiles.
TILES_PER_THREAD = 2.0
#: Tiles in flight at the least, whatever the cluster's size (an adaptive cluster at zero
#: workers still gets work to scale up for).
MIN_WINDOW = 4
#: Seconds between two readings of the cluster's thread count.
RESIZE_EVERY = 1.0


@dataclass
class WindowStats:
    """What a :func:`map_tiles` run did, in a few numbers (nothing grows with the tiles).

    ``starved`` counts the completions after which fewer tiles were in flight than the
    cluster had threads while tiles were still waiting to be submitted: 0 when the cluster
    was kept busy.
    """

    submitted: int = 0
    finished: int = 0
    failed: int = 0
    peak_in_flight: int = 0
    starved: int = 0
    threads: int = 0
    window: int = 0
    trace: Callable[[str, Tile, float], None] | None = field(default=None, repr=False)

    def _event(self, what: str, tile: Tile) -> None:
        if self.trace is not None:
            self.trace(what, tile, time.time())


@dataclass(frozen=True)
class TileResult:
    """One tile's outcome: its task's ``value``, or the ``error`` that stopped it."""

    tile: Tile
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Window:
    """The number of tiles to keep in flight, re-read from the cluster now and then."""

    def __init__(self, client: Client, per_thread: float, stats: WindowStats) -> None:
        self.client, self.per_thread, self.stats = client, per_thread, stats
        self.size, self._read_at = MIN_WINDOW, -float("inf")

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._read_at >= RESIZE_EVERY:
            self._read_at = now
            threads = sum(self.client.nthreads().values())
            size = max(MIN_WINDOW, round(self.per_thread * threads))
            if size != self.size or threads != self.stats.threads:
                log.debug("window: %d tiles in flight for %d threads", size, threads)
            self.size, self.stats.threads, self.stats.window = size, threads, size
        return self.size


def map_tiles(
    client: Client,
    tiles: Iterable[Tile],
    build: Callable[[Tile], Any],
    *,
    total: int | None = None,
    per_thread: float = TILES_PER_THREAD,
    desc: str = "tiles",
    progress: bool = False,
    stats: WindowStats | None = None,
    retries: int = 1,
) -> Iterator[TileResult]:
    """Run every tile's task, ``build(tile)`` → ``(fn, args, kwargs)`` run on a worker as
    ``fn(*args, **kwargs)``; yield the results as they end.

    Parameters
    ----------
    client
        A connected client.
    tiles
        The tiles, consumed lazily (a generator over a continent is fine).
    build
        Makes one tile's task on the client; an exception it raises is that tile's error
        (the other tiles go on). Each task is one ``client.submit`` (no graph to build or
        tokenize: the client's cost per tile is what keeps a large cluster fed).
    total
        How many tiles there are, for the progress bar (``len(tiles)`` when it has one).
    per_thread
        Tiles in flight per worker thread of the cluster (at least :data:`MIN_WINDOW`).
    desc, progress
        Progress bar label (the bar shows tiles/s and the time left), and whether to show it.
    stats
        Filled in as the run goes (see :class:`WindowStats`).
    retries
        Times a task that raised is run again (on any worker) before its error is the
        tile's: a worker's passing fault does not fail the pass.

    Yields
    ------
    TileResult
        In completion order. A tile's future is released once yielded.
    """
    stats = WindowStats() if stats is None else stats
    if total is None and hasattr(tiles, "__len__"):
        total = len(tiles)  # type: ignore[arg-type]
    todo = iter(tiles)
    window = _Window(client, per_thread, stats)
    owner: dict[Any, Tile] = {}
    early: list[TileResult] = []  # tiles whose graph could not be built
    ac = as_completed(with_results=True, raise_errors=False)
    more = True

    def fill() -> None:
        nonlocal more
        while more and len(owner) < window():
            tile = next(todo, None)
            if tile is None:
                more = False
                return
            try:
                fn, args, kwargs = build(tile)
                fut = client.submit(fn, *args, **kwargs, pure=False, retries=retries)
            except Exception as e:  # building the graph failed (catalog, metadata)
                early.append(TileResult(tile, error=e))
                continue
            owner[fut] = tile
            ac.add(fut)
            stats.submitted += 1
            stats.peak_in_flight = max(stats.peak_in_flight, len(owner))
            stats._event("submit", tile)

    bar = tqdm(total=total, desc=desc, unit="tile", disable=not progress, smoothing=0.1)
    try:
        fill()
        while early or owner:
            yield from _drain(early, stats, bar)
            if not owner:
                fill()
                continue
            fut, value = next(ac)
            tile = owner.pop(fut)
            result = _result(tile, fut, value)
            fut.release()
            stats.finished += 1
            stats._event("done", tile)
            fill()
            if more and len(owner) < stats.threads:
                stats.starved += 1
            if not result.ok:
                stats.failed += 1
            bar.set_postfix(in_flight=len(owner), refresh=False)
            bar.update()
            yield result
    finally:
        bar.close()
        for fut in owner:  # the caller stopped early: the tiles in flight are not wanted
            fut.cancel()


def _drain(early: list[TileResult], stats: WindowStats, bar) -> Iterator[TileResult]:
    while early:
        stats.failed += 1
        bar.update()
        yield early.pop()


def _result(tile: Tile, fut, value: Any) -> TileResult:
    """A tile's outcome from its future: an error comes as ``(type, exception, traceback)``,
    a cancellation as the exception itself."""
    if fut.status == "error":
        return TileResult(tile, error=value[1])
    if isinstance(value, BaseException):
        return TileResult(tile, error=value)
    return TileResult(tile, value=value)
