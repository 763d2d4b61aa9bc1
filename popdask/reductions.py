"""What each tile task sends back to the client, and how the client combines it.

Nothing here grows with the region (DESIGN.md "Nothing on the client grows with the
region"):

- the densities fit sees a **bounded sample of census cells**: every cell with a known count
  is kept with probability ``p = min(1, fit_cells / known cells)``, decided by a hash of
  its position and the run's seed, so each tile task picks its own rows (the label task,
  a resumed run's read of stored labels and the context task pick the same ones) and the
  client gathers at most about ``fit_cells`` rows (:class:`CellRows`);
- the run's totals are sums per tile (:class:`Totals`).

A sample rather than sufficient statistics because the fit is not least squares: its
quasi-Poisson Newton steps, ridge path and inner cross-validation each need the rows, and
a few hundred thousand cells pin ≤ 450 non-negative densities far more tightly than the
cells' own scatter around the model does (``benchmarks/fit_sample.py`` measures a sampled
fit against the full one on real cells; ``benchmarks/continent.py`` an EU-sized fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fast, well-mixed hash of uint64 values (wrapping)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform(index: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per cell ``index`` (flat position in the region), fixed by ``seed``.

    The same cell gets the same number in every task and every run with that seed.
    """
    key = np.asarray(index, np.int64).astype(np.uint64) ^ _splitmix64(np.uint64([seed]))[0]
    return (_splitmix64(key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_share(fit_cells: int, known_cells: int) -> float:
    """The probability ``p`` of keeping a known cell so that about ``fit_cells`` are kept."""
    return 1.0 if known_cells <= fit_cells else fit_cells / known_cells


def tile_cell_index(rows: slice, cols: slice, n_cols: int) -> np.ndarray:
    """Flat region positions ``row * n_cols + col`` of a tile's cells, ``(y_cell, x_cell)``."""
    r = np.arange(rows.start, rows.stop, dtype=np.int64)[:, None]
    c = np.arange(cols.start, cols.stop, dtype=np.int64)[None, :]
    return r * n_cols + c


@dataclass
class CellRows:
    """Sampled cells: their flat region ``index``, ``census`` count and design columns.

    ``columns`` holds named ``(n, k)`` blocks (``fractions``, and the raw term-weighted
    fractions such as ``intensity`` or ``context``); ``tops`` the largest term value seen
    in the tiles (over every pixel, sampled or not), which scales each term.
    """

    index: np.ndarray
    census: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    tops: dict[str, float] = field(default_factory=dict)

    @classmethod
    def pick(
        cls,
        index: np.ndarray,
        census: np.ndarray,
        keep: np.ndarray,
        columns: dict[str, np.ndarray],
        tops: dict[str, float] | None = None,
    ) -> CellRows:
        """The rows ``keep`` (a ``(y_cell, x_cell)`` mask) of a tile's cell arrays; the
        columns are ``(y_cell, x_cell, k)`` and are stored as float32."""
        return cls(
            index[keep],
            np.asarray(census, np.float64)[keep],
            {n: np.asarray(c, np.float32)[keep] for n, c in columns.items()},
            dict(tops or {}),
        )

    def __len__(self) -> int:
        return len(self.index)


def concat_rows(parts: Iterable[CellRows]) -> CellRows:
    """One :class:`CellRows` of the parts, ordered by cell index (so the result does not
    depend on which tile finished first); term tops are the parts' maxima."""
    parts = list(parts)
    if not parts:
        return CellRows(np.zeros(0, np.int64), np.zeros(0))
    index = np.concatenate([p.index for p in parts])
    order = np.argsort(index, kind="stable")
    names = parts[0].columns.keys()
    columns = {n: np.concatenate([p.columns[n] for p in parts])[order] for n in names}
    tops: dict[str, float] = {}
    for p in parts:
        for n, v in p.tops.items():
            tops[n] = max(tops.get(n, 0.0), v)
    census = np.concatenate([p.census for p in parts])[order]
    return CellRows(index[order], census, columns, tops)


def block_groups_of(index: np.ndarray, n_cols: int, cells_per_block: int) -> np.ndarray:
    """The spatial block id of cells given by flat ``index`` — the same ids as
    :func:`popdask.regression.block_groups` gives on the whole region."""
    per = max(int(cells_per_block), 1)
    r, c = np.divmod(np.asarray(index, np.int64), n_cols)
    return (r // per) * (n_cols // per + 1) + c // per


@dataclass
class Totals:
    """Sums over tiles: people estimated, and census against estimate on known cells."""

    population: float = 0.0
    population_known_cells: float = 0.0
    census_known: float = 0.0
    cells_known: int = 0
    #: cells with people that a constraint mask leaves no pixel, and their census
    cells_emptied_by_mask: int = 0
    people_in_cells_emptied_by_mask: float = 0.0

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def of_tile(
        cls,
        population: np.ndarray,
        census: np.ndarray,
        cell_px: int,
        emptied: np.ndarray | None = None,
    ) -> Totals:
        """A tile's totals from its ``(y, x)`` population and its cells' census (and the
        cells a mask emptied, :func:`popdask.mask.emptied_cells`)."""
        ny, nx = census.shape
        cells = population.astype(np.float64).reshape(ny, cell_px, nx, cell_px).sum(axis=(1, 3))
        census = np.asarray(census, np.float64)
        known = np.isfinite(census)
        emptied = np.zeros(census.shape, bool) if emptied is None else emptied
        return cls(
            float(np.nansum(population, dtype=np.float64)),
            float(cells[known].sum()),
            float(census[known].sum()),
            int(known.sum()),
            int(emptied.sum()),
            float(census[emptied].sum()),
        )


def sum_totals(parts: Sequence[Totals] | Iterable[Totals]) -> Totals:
    out = Totals()
    for p in parts:
        out = out + p
    return out
