"""The per-tile reductions: the fit's cell sample picked the same in every task, rows combined
in cell order whatever the tiles' order, spatial groups as on the whole region, totals."""

from __future__ import annotations

import numpy as np
import pytest

from popdask.grid import Grid
from popdask.reductions import (
    CellRows,
    Totals,
    block_groups_of,
    concat_rows,
    sample_share,
    sum_totals,
    tile_cell_index,
    uniform,
)
from popdask.regression import block_groups


def test_uniform_is_fixed_by_cell_and_seed_and_uniform():
    index = np.arange(200_000)
    u = uniform(index, 7)
    np.testing.assert_array_equal(u, uniform(index, 7))  # the same in every task
    np.testing.assert_array_equal(u[1234:1240], uniform(index[1234:1240], 7))
    assert not np.array_equal(u, uniform(index, 8))
    assert 0 <= u.min() and u.max() < 1
    # uniform: each tenth of [0, 1) holds a tenth of the cells, neighbours uncorrelated
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts / len(u) - 0.1) < 0.005)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_a_share_picks_about_fit_cells():
    assert sample_share(1000, 800) == 1.0
    p = sample_share(200_000, 4_200_000)
    picked = (uniform(np.arange(4_200_000), 0) < p).sum()
    assert abs(picked - 200_000) < 3 * np.sqrt(200_000)


def test_tile_rows_combine_in_cell_order_whatever_the_tiles_order():
    grid = Grid.from_bbox((0, 0, 6000, 4000), tile=2000)
    n_cols = grid.cell_shape[1]
    census = np.arange(np.prod(grid.cell_shape), dtype=np.float64).reshape(grid.cell_shape)
    census[1, 2] = np.nan
    parts = []
    for t in grid.tiles():
        idx = tile_cell_index(t.ys_cell, t.xs_cell, n_cols)
        c = census[t.ys_cell, t.xs_cell]
        fr = np.repeat(c[..., None], 3, axis=-1)
        keep = np.isfinite(c)
        parts.append(CellRows.pick(idx, c, keep, {"fractions": fr}, {"x": float(t.col)}))
    forward, backward = concat_rows(parts), concat_rows(parts[::-1])
    known = np.flatnonzero(np.isfinite(census.ravel()))
    for rows in (forward, backward):
        np.testing.assert_array_equal(rows.index, known)
        np.testing.assert_array_equal(rows.census, census.ravel()[known])
        np.testing.assert_array_equal(rows.columns["fractions"][:, 0], census.ravel()[known])
        assert rows.tops == {"x": 2.0}
    assert len(concat_rows([])) == 0


@pytest.mark.parametrize("per", [1, 2, 5])
def test_block_groups_of_cells_match_the_whole_region(per):
    shape = (13, 17)
    whole = block_groups(shape, per).ravel()
    index = np.arange(shape[0] * shape[1])[::3]
    np.testing.assert_array_equal(block_groups_of(index, shape[1], per), whole[index])


def test_totals_of_tiles_add_up():
    pop = np.ones((100, 100), np.float32)
    census = np.array([[2500.0, np.nan], [0.0, 10.0]])
    t = Totals.of_tile(pop, census, 50)
    assert t == Totals(10_000.0, 7_500.0, 2_510.0, 3)
    assert sum_totals([t, t]) == Totals(20_000.0, 15_000.0, 5_020.0, 6)
