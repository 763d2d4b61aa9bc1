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
    per_task: int | None = 1,
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
    per_task
        Tiles run by one task, one after the other (each keeps its own result or error);
        None chooses it from the tiles and the window (:func:`tiles_per_task`), for passes
        whose tasks are as short as the client's work per submission.

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
    group = per_task or tiles_per_task(total, window())
    owner: dict[Any, list[Tile]] = {}
    early: list[TileResult] = []  # tiles whose task could not be built
    ac = as_completed(with_results=True, raise_errors=False)
    more = True

    def next_specs() -> list[tuple[Tile, tuple]]:
        nonlocal more
        specs = []
        while more and len(specs) < group:
            tile = next(todo, None)
            if tile is None:
                more = False
                break
            try:
                specs.append((tile, build(tile)))
            except Exception as e:  # building the task failed (catalog, metadata)
                early.append(TileResult(tile, error=e))
        return specs

    def fill() -> None:
        while more and len(owner) < window():
            specs = next_specs()
            if not specs:
                continue
            if len(specs) == 1:
                fn, args, kwargs = specs[0][1]
                fut = client.submit(fn, *args, **kwargs, pure=False, retries=retries)
            else:
                fut = client.submit(run_group, [b for _, b in specs], pure=False, retries=retries)
            owner[fut] = [t for t, _ in specs]
            ac.add(fut)
            stats.submitted += len(specs)
            stats.peak_in_flight = max(stats.peak_in_flight, len(owner))
            for t, _ in specs:
                stats._event("submit", t)

    bar = tqdm(total=total, desc=desc, unit="tile", disable=not progress, smoothing=0.1)
    try:
        fill()
        while early or owner:
            yield from _drain(early, stats, bar)
            if not owner:
                fill()
                continue
            fut, value = next(ac)
            group_tiles = owner.pop(fut)
            results = _results(group_tiles, fut, value)
            fut.release()
            fill()
            if more and len(owner) < stats.threads:
                stats.starved += 1
            bar.set_postfix(in_flight=len(owner), refresh=False)
            for result in results:
                stats.finished += 1
                stats.failed += not result.ok
                stats._event("done", result.tile)
                bar.update()
                yield result
    finally:
        bar.close()
        for fut in owner:  # the caller stopped early: the tiles in flight are not wanted
            fut.cancel()


#: Tiles one task runs at the most when :func:`map_tiles` chooses (``per_task=None``).
MAX_PER_TASK = 16


def tiles_per_task(total: int | None, window: int) -> int:
    """Tiles per task so that every task of the window is fed about four times over:
    1 for a region of a few windows, up to :data:`MAX_PER_TASK` for a continent."""
    if not total:
        return 1
    return max(1, min(MAX_PER_TASK, total // (4 * max(window, 1))))


def run_group(specs: list[tuple]) -> list[tuple[bool, Any]]:
    """One task running several tiles' ``(fn, args, kwargs)`` one after the other:
    ``(True, result)`` or ``(False, error)`` for each, so a tile's error stays its own."""
    out = []
    for fn, args, kwargs in specs:
        try:
            out.append((True, fn(*args, **kwargs)))
        except Exception as e:
            out.append((False, e))
    return out


def _results(tiles: list[Tile], fut, value: Any) -> list[TileResult]:
    """Each tile's outcome from its task's future (one tile's value, or a group's list)."""
    if len(tiles) == 1:
        return [_result(tiles[0], fut, value)]
    group = _result(tiles[0], fut, value)
    if not group.ok:  # the whole task failed (its worker died too often): every tile
        return [TileResult(t, error=group.error) for t in tiles]
    return [
        TileResult(t, value=v) if ok else TileResult(t, error=v)
        for t, (ok, v) in zip(tiles, group.value, strict=True)
    ]


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
