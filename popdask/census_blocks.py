"""The census streamed into blocks of cells: the client never holds the region's census.

A run's census can be the EU's (4.2 M cells from a table of millions of rows). :func:`stage`
reads the table a batch of rows at a time, spills each batch's rows by *block* (10 × 10 tiles
of cells, one chunk of the store's ``census``) to a local scratch folder, then classifies each
block on its own window of the coverage (:func:`popdask.census.classify_cells` on the block's
grid) and keeps the block's raster on disk. :meth:`Staged.write` copies the blocks into the
store, one chunk each. The client holds one batch of rows or one block of cells at a time.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from popdask.census import (
    BATCH_ROWS,
    UNKNOWN,
    Absent,
    CensusError,
    classify_cells,
    count_cells,
    coverage_name,
    fetch_local,
    iter_cells,
    no_coverage_error,
    open_coverage,
    open_table,
)
from popdask.grid import EPSG, Grid
from popdask.variables import reconcile, share_sums

if TYPE_CHECKING:
    from popdask.config import CensusConfig

log = logging.getLogger(__name__)

#: a block is this many tiles on a side (the store's census chunk: 4,200 files for the EU)
BLOCK_TILES = 10


def row_dtype(n_values: int) -> np.dtype:
    """A spilled row: the cell's lower-left corner, its values (the population column, then
    the mapped variables) and its confidentiality flag."""
    return np.dtype([("x", "<i8"), ("y", "<i8"), ("v", "<f8", (n_values,)), ("flag", "?")])


@dataclass(frozen=True)
class Block:
    """A block of census cells: its place in the region's ``(y_cell, x_cell)`` raster and
    its own grid (for the coverage and the classification)."""

    index: int
    ys: slice
    xs: slice
    grid: Grid

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ys.stop - self.ys.start, self.xs.stop - self.xs.start)


def block_cells(grid: Grid) -> int:
    """Cells on a side of a block (and of a chunk of the store's ``census``)."""
    return BLOCK_TILES * grid.tile // grid.cell


def blocks(grid: Grid) -> list[Block]:
    """The region's blocks, row by row from the north-west corner (the last ones cut short)."""
    n, (ny, nx), c = block_cells(grid), grid.cell_shape, grid.cell
    xmin, _, _, ymax = grid.bounds
    out: list[Block] = []
    for r0 in range(0, ny, n):
        for c0 in range(0, nx, n):
            r1, c1 = min(r0 + n, ny), min(c0 + n, nx)
            bounds = (xmin + c0 * c, ymax - r1 * c, xmin + c1 * c, ymax - r0 * c)
            sub = Grid(bounds, resolution=grid.resolution, cell=c, tile=grid.tile)
            out.append(Block(len(out), slice(r0, r1), slice(c0, c1), sub))
    return out


def array_window(covered: np.ndarray) -> Callable[[Block], np.ndarray]:
    """A coverage given as a region-sized array (small regions, tests), read per block."""
    return lambda b: np.asarray(covered, dtype=bool)[b.ys, b.xs]


@dataclass
class Staged:
    """The census of a region, classified block by block and kept in a scratch folder."""

    grid: Grid
    folder: Path
    blocks: list[Block]
    attrs: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of the blocks' float32 values, block after block
    finite_cells: int = 0  # known or zero by absence: the cells a fit can use
    variables: list[str] = field(default_factory=list)  # census.columns mapped besides
    by_attrs: dict[str, Any] = field(default_factory=dict)  # region shares, reconciled cells

    def block(self, b: Block) -> np.ndarray:
        """One block's census, float32 (NaN where unknown)."""
        return np.fromfile(self.folder / f"{b.index}.f32", np.float32).reshape(b.shape)

    def block_by(self, b: Block) -> np.ndarray:
        """One block's mapped variables ``(variable, y_cell, x_cell)``, reconciled."""
        raw = np.fromfile(self.folder / f"{b.index}.by.f32", np.float32)
        return raw.reshape(len(self.variables), *b.shape)

    def write(self, array, by_array=None, *, progress: bool = False) -> None:
        """Copy every block into ``array`` (the store's ``census``: a chunk per block) and,
        with variables, into ``by_array`` (``census_by``)."""
        from tqdm.auto import tqdm

        for b in tqdm(self.blocks, desc="census", unit="block", disable=not progress):
            array[b.ys, b.xs] = self.block(b)
            if by_array is not None:
                by_array[:, b.ys, b.xs] = self.block_by(b)

    def to_dataarray(self) -> xr.DataArray:
        """The whole region's census as one ``(y_cell, x_cell)`` array (small regions)."""
        raster = np.full(self.grid.cell_shape, np.nan, np.float32)
        for b in self.blocks:
            raster[b.ys, b.xs] = self.block(b)
        return xr.DataArray(
            raster,
            dims=("y_cell", "x_cell"),
            coords=self.grid.cell_coords(),
            name="census",
            attrs=dict(self.attrs),
        )


@contextmanager
def stage(
    path: str | Path,
    grid: Grid,
    *,
    column: str = "TOT_P_2021",
    storage_options: dict | None = None,
    absent: Absent = "zero",
    coverage: Callable[[Block], np.ndarray] | None = None,
    flag_column: str | None = None,
    variables: Sequence[str] = (),
    batch_rows: int = BATCH_ROWS,
) -> Iterator[Staged]:
    """Read a GISCO 1 km grid file into blocks of ``grid``'s cells, a batch at a time.

    Parameters are those of :func:`popdask.census.read_census`, but ``coverage`` gives a
    block's covered cells (``None``: the whole region is covered). The staged blocks live in
    a temporary folder removed when the context ends.

    Raises
    ------
    CensusError
        As :func:`popdask.census.read_census`: before anything is written anywhere.
    """
    name = str(path)
    with tempfile.TemporaryDirectory(prefix="popdask-census-") as tmp:
        folder = Path(tmp)
        local = fetch_local(name, storage_options) if "://" in name else Path(path)
        try:
            table = open_table(local, name, column, flag_column, variables)
            _spill(table, grid, folder, batch_rows)
        finally:
            if local != Path(path):
                local.unlink(missing_ok=True)
        staged = Staged(grid, folder, blocks(grid), variables=list(variables))
        _classify(staged, coverage, absent=absent, flagged=bool(table.flag_column))
        if not staged.attrs["cells_known"]:
            raise CensusError(
                f"{name}: no known {column} value inside the region {grid.bounds} "
                f"(EPSG:{EPSG}); the file does not cover the region — check region.bbox or use "
                "the right country file"
            )
        staged.attrs.update(
            units="persons",
            source=Path(name.split("?")[0]).name,
            column=column,
            absent=absent,
            flag_column=table.flag_column or "",
        )
        _log(staged, absent)
        yield staged


@contextmanager
def stage_from_config(cfg: CensusConfig, grid: Grid) -> Iterator[Staged]:
    """:func:`stage` with everything the configuration's ``census`` section says (its
    coverage opened by :func:`popdask.census.open_coverage` and read block by block)."""
    with open_coverage(
        cfg.coverage,
        countries=cfg.coverage_countries,
        country_property=cfg.coverage_property,
        storage_options=cfg.storage_options,
    ) as cov:
        window = None if cov.whole else (lambda b: cov.window(b.grid))
        with stage(
            cfg.path,
            grid,
            column=cfg.column,
            storage_options=cfg.storage_options,
            absent=cfg.absent,
            coverage=window,
            flag_column=cfg.flag_column,
            variables=mapped_columns(cfg),
        ) as staged:
            if window is not None and not staged.attrs["cells_covered"]:
                raise no_coverage_error(cfg.coverage, grid)
            staged.attrs["coverage"] = coverage_name(cfg.coverage)
            if cfg.coverage_countries:
                staged.attrs["coverage_countries"] = list(cfg.coverage_countries)
            yield staged


def mapped_columns(cfg: CensusConfig) -> list[str]:
    """The variables mapped besides the population: ``census.columns``, none when it is
    unset or names the population column alone (the population layer is that one)."""
    columns = list(cfg.columns or [])
    return [] if columns in ([], [cfg.column]) else columns


def _spill(table, grid: Grid, folder: Path, batch_rows: int) -> None:
    """Append each batch's rows inside the region to its block's file, in file order (a cell
    listed twice keeps its last row, as when the table is read whole)."""
    n, (ny, nx) = block_cells(grid), grid.cell_shape
    xmin, _, _, ymax = grid.bounds
    per_row = -(-nx // n)  # blocks in a row of blocks
    dtype = row_dtype(1 + len(table.variables))
    for x, y, v, flagged in iter_cells(table, grid, batch_rows):
        col = (np.asarray(x, np.int64) - xmin) // grid.cell
        row = (ymax - grid.cell - np.asarray(y, np.int64)) // grid.cell
        inside = (row >= 0) & (row < ny) & (col >= 0) & (col < nx)
        if not inside.any():
            continue
        rows = np.empty(int(inside.sum()), dtype)
        rows["x"], rows["y"] = x[inside], y[inside]
        rows["v"] = v[inside].reshape(len(rows), -1)
        rows["flag"] = False if flagged is None else flagged[inside]
        key = (row[inside] // n) * per_row + col[inside] // n
        order = np.argsort(key, kind="stable")
        keys, starts = np.unique(key[order], return_index=True)
        for k, part in zip(keys, np.split(rows[order], starts[1:]), strict=True):
            with open(folder / f"{k}.rows", "ab") as f:
                f.write(part.tobytes())


def _classify(
    staged: Staged,
    coverage: Callable[[Block], np.ndarray] | None,
    *,
    absent: Absent,
    flagged: bool,
) -> None:
    """Classify every block from its spilled rows and coverage; keep its rasters on disk."""
    folder, names = staged.folder, staged.variables
    dtype = row_dtype(1 + len(names))
    sha = hashlib.sha256()
    counts = dict.fromkeys(("cells_known", "cells_absent_zero", "cells_unknown"), 0)
    covered_cells, n_scaled = 0, 0
    num = den = np.zeros(len(names))
    for b in staged.blocks:
        spilled = folder / f"{b.index}.rows"
        rows = np.fromfile(spilled, dtype) if spilled.exists() else np.empty(0, dtype)
        covered = None if coverage is None else coverage(b)
        covered_cells += b.shape[0] * b.shape[1] if covered is None else int(covered.sum())
        kw = dict(covered=covered, absent=absent, flagged=rows["flag"] if flagged else None)
        # the population column, then each mapped variable, classified alike
        (raster, state), *more = (
            classify_cells(rows["x"], rows["y"], rows["v"][:, j], b.grid, **kw)
            for j in range(1 + len(names))
        )
        raster.tofile(folder / f"{b.index}.f32")
        if names:
            by, scaled = reconcile(raster, np.stack([r for r, _ in more]), names)
            by.tofile(folder / f"{b.index}.by.f32")
            sha.update(by.tobytes())
            n_scaled += scaled
            bn, bd = share_sums(raster, by)
            num, den = num + bn, den + bd
        spilled.unlink(missing_ok=True)
        sha.update(raster.tobytes())
        for k, v in count_cells(state).items():
            counts[k] += v
        staged.finite_cells += int((state != UNKNOWN).sum())
    staged.sha256 = sha.hexdigest()
    staged.attrs.update(counts, cells_covered=covered_cells)
    if names:
        with np.errstate(invalid="ignore", divide="ignore"):
            region = np.where(den > 0, num / den, 0.0)
        staged.by_attrs = {"region_share": [float(v) for v in region], "reconciled": n_scaled}


def _log(staged: Staged, absent: str) -> None:
    a = staged.attrs
    log.info(
        "census %s: %d cells: %d known, %d zero by absence (absent: %s), %d unknown "
        "(flagged/empty/negative or outside the coverage)",
        a["source"],
        a["cells_known"] + a["cells_absent_zero"] + a["cells_unknown"],
        a["cells_known"],
        a["cells_absent_zero"],
        absent,
        a["cells_unknown"],
    )
