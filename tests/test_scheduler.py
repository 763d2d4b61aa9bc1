"""The window of tiles in flight, on a real LocalCluster: new tiles reach the cluster while
earlier ones still run, errors stay with their tile, and the window follows the cluster."""

from __future__ import annotations

import time

import pytest
from distributed import Client, LocalCluster

from popdask.grid import Grid
from popdask.scheduler import MIN_WINDOW, WindowStats, map_tiles

pytestmark = pytest.mark.integration


def _slow(tile_id: str, seconds: float) -> tuple[str, float, float]:
    start = time.time()
    time.sleep(seconds)
    return tile_id, start, time.time()


def _fails(tile_id: str) -> None:
    raise ValueError(f"no scene for {tile_id}")


@pytest.fixture(scope="module")
def tiles():
    """A 4 × 4 grid of 1 km tiles (16 tiles, far more than the cluster's threads)."""
    grid = Grid.from_bbox((0, 0, 4000, 4000), resolution=20, cell=1000, tile=1000)
    return grid.tiles()


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_new_tiles_are_submitted_while_earlier_ones_run(client, tiles):
    events: dict[str, dict[str, float]] = {}
    stats = WindowStats(trace=lambda what, t, at: events.setdefault(t.id, {}).update({what: at}))

    def build(t):
        return _slow, (t.id, 0.1 + 0.05 * (t.col % 3)), {}

    results = list(map_tiles(client, tiles, build, stats=stats))
    assert sorted(r.tile.id for r in results) == sorted(t.id for t in tiles)
    assert all(r.ok and r.value[0] == r.tile.id for r in results)
    window = max(MIN_WINDOW, 2 * 2)
    assert stats.threads == 2 and stats.window == window
    assert stats.threads <= stats.peak_in_flight <= window
    assert stats.starved == 0 and stats.submitted == len(tiles)
    # every tile past the first window was submitted while earlier tiles were still in
    # flight: batch after batch, a batch's first tile waits for the whole previous batch
    order = sorted(events, key=lambda i: events[i]["submit"])
    late = order[window:]
    assert late
    for tid in late:
        at = events[tid]["submit"]
        in_flight = [o for o in order if events[o]["submit"] < at < events[o]["done"]]
        assert len(in_flight) >= window - 1, f"{tid} found {len(in_flight)} tiles in flight"
    # ... and the workers were busy then: most late tiles arrived while a task ran
    runs = {r.value[0]: r.value[1:] for r in results}
    busy = [t for t in late if any(s <= events[t]["submit"] < e for s, e in runs.values())]
    assert len(busy) >= len(late) / 2


def test_errors_stay_with_their_tile(client, tiles):
    def build(t):
        if t.row == 0 and t.col == 0:
            raise RuntimeError("catalog down")  # building the graph fails
        if t.row == 1:
            return _fails, (t.id,), {}
        return _slow, (t.id, 0.0), {}

    stats = WindowStats()
    results = {r.tile.id: r for r in map_tiles(client, tiles, build, stats=stats)}
    assert len(results) == len(tiles)
    bad = {t.id for t in tiles if t.row == 1 or (t.row, t.col) == (0, 0)}
    assert {i for i, r in results.items() if not r.ok} == bad
    assert stats.failed == len(bad) and stats.finished + 1 == len(tiles)
    first = results[tiles[0].id].error
    assert isinstance(first, RuntimeError) and "catalog down" in str(first)
    row1 = next(r for r in results.values() if r.tile.row == 1)
    assert isinstance(row1.error, ValueError) and row1.tile.id in str(row1.error)


def test_window_follows_a_growing_cluster(tiles):
    """Started on one worker thread, the window is the minimum; once a second worker joins
    it is re-read and grows to ``per_thread`` × 2 threads."""
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as c,
    ):
        seen = []
        done = []

        def trace(what, t, at):
            if what == "done":
                done.append(t.id)
                if len(done) == 2:
                    cluster.scale(2)
            seen.append(stats.window)

        stats = WindowStats(trace=trace)

        def build(t):
            return _slow, (t.id, 0.25), {}

        results = list(map_tiles(c, tiles * 2, build, per_thread=3, stats=stats))
        assert len(results) == 2 * len(tiles) and all(r.ok for r in results)
        assert seen[0] == MIN_WINDOW  # one thread: 3 → the minimum of 4
        assert stats.threads == 2 and stats.window == 6
        assert stats.peak_in_flight == 6


def test_short_tasks_run_several_tiles_each_and_keep_their_own_errors(client, tiles):
    """Grouped (``per_task``), a task runs several tiles one after the other; each tile
    still gets its own result or error, and tasks, not tiles, fill the window."""
    from popdask.scheduler import tiles_per_task

    assert tiles_per_task(4, 4) == 1 and tiles_per_task(400, 4) == 16
    assert tiles_per_task(100, 4) == 6 and tiles_per_task(None, 4) == 1

    def build(t):
        if t.row == 2 and t.col == 1:
            return _fails, (t.id,), {}
        return _slow, (t.id, 0.02), {}

    stats = WindowStats()
    results = {r.tile.id: r for r in map_tiles(client, tiles, build, stats=stats, per_task=3)}
    assert len(results) == len(tiles) and stats.submitted == len(tiles)
    bad = next(t.id for t in tiles if (t.row, t.col) == (2, 1))
    assert {i for i, r in results.items() if not r.ok} == {bad}
    assert isinstance(results[bad].error, ValueError) and bad in str(results[bad].error)
    assert all(r.value[0] == i for i, r in results.items() if r.ok)
    # 16 tiles in tasks of 3: 6 tasks, at most a window of them in flight
    assert stats.peak_in_flight <= stats.window and stats.failed == 1
