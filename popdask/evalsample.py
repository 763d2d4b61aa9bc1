"""The bounded part of a store that :func:`popdask.evaluate.evaluate` scores.

The protocol (1 km cross-validation, bias by class, coarse to fine) needs whole blocks of
cells with their design columns, so it cannot run on scattered cells; and a continent's
design (4.2 M cells × 450 columns) does not fit a client. So a region of more than
``max_cells`` cells is scored on **windows**: squares of ``side`` cells, aligned on the
region's cell grid at multiples of ``side`` (so every 2, 5 and 10 km block of the region is
whole inside one window), picked in an order fixed by a hash of their position among those
with known census cells. Their cells' design columns are computed tile by tile from the
stored labels and term layers (:func:`popdask.tasks.cell_design`), and the windows are laid
side by side, ``gap`` unknown cells apart, into one mosaic the protocol takes as a region:
no block straddles two windows. A region of at most ``max_cells`` cells is one window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np

from popdask import store, tasks
from popdask.grid import Grid, Tile
from popdask.reductions import uniform

#: Cells the evaluation scores at the most (the windows' cells together).
MAX_CELLS = 250_000
#: Side of a window in cells (100 km of 1 km cells: ten 10 km tiles across).
SIDE = 100
#: Unknown cells between two windows of the mosaic (more than the largest coarse block).
GAP = 10


@dataclass(frozen=True)
class Window:
    """Rows and columns of cells ``[r0, r1) × [c0, c1)`` of the region."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def choose_windows(
    path: str,
    grid: Grid,
    *,
    max_cells: int = MAX_CELLS,
    side: int = SIDE,
    seed: int = 0,
    storage_options=None,
) -> list[Window]:
    """The windows the evaluation scores: the whole region when it has at most
    ``max_cells`` cells, else up to ``max_cells // side²`` windows with known census."""
    ny, nx = grid.cell_shape
    if ny * nx <= max_cells:
        return [Window(0, ny, 0, nx)]
    per_tile = grid.tile // grid.cell
    side = max(per_tile, side // per_tile * per_tile)  # whole tiles
    rows, cols = -(-ny // side), -(-nx // side)
    order = np.argsort(uniform(np.arange(rows * cols), seed), kind="stable")
    chosen: list[Window] = []
    for i in order:
        r, c = divmod(int(i), cols)
        w = Window(r * side, min(ny, (r + 1) * side), c * side, min(nx, (c + 1) * side))
        census = store.read_window(
            path, "census", slice(w.r0, w.r1), slice(w.c0, w.c1), storage_options
        )
        if np.isfinite(census).any():
            chosen.append(w)
        if sum(a * b for a, b in (x.shape for x in chosen)) + side * side > max_cells:
            break
    return chosen


def _tiles_of(grid: Grid, w: Window) -> list[Tile]:
    """The tiles whose cells lie inside ``w`` (windows are made of whole tiles)."""
    per = grid.tile // grid.cell
    return [t for t in grid.tiles() if w.r0 <= t.row * per < w.r1 and w.c0 <= t.col * per < w.c1]


def window_design(
    path: str,
    grid: Grid,
    w: Window,
    *,
    k: int,
    layers: Sequence[int] = (),
    scale: Sequence[float] | None = None,
    storage_options=None,
) -> np.ndarray:
    """``(rows, cols, (1 + m) k)`` design of the window's cells: cluster fractions, then the
    fractions weighted by each stored term layer ``layers`` divided by its ``scale`` (as the
    run's fit), computed per tile (locally, one small task per tile)."""
    so = dict(storage_options or {})
    tiles = _tiles_of(grid, w)
    parts = dask.compute(
        *(
            dask.delayed(tasks.cell_design)(path, so, t, k, list(layers), grid.cell_px)
            for t in tiles
        )
    )
    out = np.full((*w.shape, (1 + len(layers)) * k), np.nan)
    for t, part in zip(tiles, parts, strict=True):
        rs = slice(t.ys_cell.start - w.r0, t.ys_cell.stop - w.r0)
        cs = slice(t.xs_cell.start - w.c0, t.xs_cell.stop - w.c0)
        out[rs, cs] = part
    if layers:
        s = np.repeat(np.asarray(scale, np.float64), k)
        out[..., k:] /= s
    return out


def window_cells(path: str, name: str, w: Window, storage_options=None) -> np.ndarray:
    """A cell variable (``census``, ``predicted``) over the window, float64."""
    return store.read_window(
        path, name, slice(w.r0, w.r1), slice(w.c0, w.c1), storage_options
    ).astype(np.float64)


def mosaic(parts: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
    """The windows' arrays side by side, ``gap`` NaN cells apart and NaN-padded to the
    tallest; a single part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    height = max(p.shape[0] for p in parts)
    width = sum(p.shape[1] for p in parts) + gap * (len(parts) - 1)
    out = np.full((height, width, *parts[0].shape[2:]), np.nan)
    c = 0
    for p in parts:
        out[: p.shape[0], c : c + p.shape[1]] = p
        c += p.shape[1] + gap
    return out
