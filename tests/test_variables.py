"""Census variables mapped with the population's weights: reconciliation, shares, layers."""

import numpy as np
import pandas as pd
import pytest
from conftest import write_config

from popdask import cli, store
from popdask.synthetic import CENSUS_2021_VARIABLES
from popdask.variables import partitions_of, pixel_layers, reconcile, share_sums, shares

NAMES = ["M", "F", "Y_LT15", "Y_1564", "Y_GE65", "EMP"]


def test_reconcile_scales_breakdowns_to_the_total_and_clips_parts():
    total = np.array([100.0, 10.0, 0.0, np.nan, 7.0, 5.0])
    values = np.array(
        [
            [48, 5, 0, 3, np.nan, 0],  # M
            [50, 6, 1, 4, 3, 0],  # F
            [20, 2, 0, 1, 1, 2],  # Y_LT15
            [60, 5, 0, 1, 4, 2],  # Y_1564
            [25, 3, 0, 1, 2, 2],  # Y_GE65
            [70, 12, 0, 1, 2, 9],  # EMP
        ],
        float,
    )
    out, n = reconcile(total, values, NAMES)
    # cell 0: M + F = 98 -> 100, ages 105 -> 100, each member keeping its share
    np.testing.assert_allclose(out[:2, 0], [48 * 100 / 98, 50 * 100 / 98], rtol=1e-6)
    np.testing.assert_allclose(out[2:5, 0].sum(), 100, rtol=1e-6)
    np.testing.assert_allclose(out[2:5, 0] / out[2:5, 0].sum(), [20 / 105, 60 / 105, 25 / 105])
    assert out[5, 0] == 70  # a part, not a breakdown: kept when <= T
    assert out[5, 1] == 10  # EMP 12 > T 10: clipped to T
    assert (out[:, 2] == 0).all()  # nobody lives there
    np.testing.assert_array_equal(out[:, 3], values[:, 3])  # T unknown: as published
    assert np.isnan(out[:2, 4]).all()  # a member unknown: the breakdown is unknown
    assert np.isnan(out[:2, 5]).all()  # M + F = 0 but T = 5: unknown, not invented
    assert n == 4  # (cell, breakdown) pairs rescaled: sex and age of 0, sex of 1, age of 5
    np.testing.assert_allclose(out[2:5, 5].sum(), 5)


def test_only_breakdowns_whose_members_are_all_mapped_are_reconciled():
    assert partitions_of(["F", "M", "EMP"]) == [[1, 0]]
    assert partitions_of(["M", "Y_LT15", "Y_1564"]) == []
    out, n = reconcile(np.array([10.0]), np.array([[8.0], [9.0]]), ["M", "Y_LT15"])
    np.testing.assert_array_equal(out[:, 0], [8, 9]) and n == 0


def test_shares_fall_back_to_the_region_and_layers_sum_to_each_cell():
    total = np.array([[10.0, np.nan], [0.0, 4.0]])
    values = np.array([[[4.0, 1.0], [0.0, np.nan]], [[6.0, 2.0], [0.0, np.nan]]])
    num, den = share_sums(total, values)
    np.testing.assert_array_equal(num, [4, 6]) and np.testing.assert_array_equal(den, [10, 10])
    region = num / den
    s = shares(total, values, region)
    np.testing.assert_allclose(s[:, 0, 0], [0.4, 0.6])
    np.testing.assert_allclose(s[:, 0, 1], region)  # T unknown: the region's shares
    np.testing.assert_allclose(s[:, 1, 1], region)  # variables unknown: the region's
    pop = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    layers = pixel_layers(pop, s, cell_px=2)
    assert layers.shape == (2, 4, 4)
    np.testing.assert_allclose(layers.sum(axis=0), pop, rtol=1e-6)  # shares sum to 1 here
    np.testing.assert_allclose(layers[0, :2, :2].sum(), 0.4 * pop[:2, :2].sum(), rtol=1e-6)


def test_the_demo_census_lists_perturbed_breakdowns(demo_region):
    table = pd.read_csv(demo_region.census)
    assert set(CENSUS_2021_VARIABLES) <= set(table.columns)
    sex = table[["M", "F"]].sum(axis=1)
    off = (sex != table["TOT_P_2021"]).mean()
    assert 0.1 < off < 0.9  # perturbed, as the Census 2021 grid is, but mostly close
    assert (table[list(CENSUS_2021_VARIABLES)] >= 0).all().all()
    assert np.abs(sex - table["TOT_P_2021"]).max() <= 6


@pytest.fixture(scope="module")
def run_by(tmp_path_factory, demo_region, stac_api, dask_cluster):
    """The test region run with every Census 2021 variable mapped."""
    d = tmp_path_factory.mktemp("by")
    cfg = write_config(d, url=stac_api, census=demo_region.census, address=dask_cluster)
    columns = "[" + ", ".join(CENSUS_2021_VARIABLES) + "]"
    argv = ["run", str(cfg), "--report-dir", str(d), "--set", f"census.columns={columns}"]
    assert cli.main(argv) == 0
    return str(d / "out.zarr")


def test_every_variable_layer_sums_to_its_cells_and_breakdowns_to_the_population(
    run_by, demo_region
):
    ds = store.open_store(run_by)
    by, pop = ds.population_by, ds.population.values
    assert by.dims == ("variable", "y", "x")
    assert list(by["variable"].values) == list(CENSUS_2021_VARIABLES)  # (.variable: xarray's)
    cpx = 50
    ny, nx = pop.shape

    def cells(a):
        return a.reshape(ny // cpx, cpx, nx // cpx, cpx).sum(axis=(1, 3), dtype=np.float64)

    census = ds.census.values
    known = np.isfinite(census)
    census_by = ds.census_by.values
    table = pd.read_csv(demo_region.census)
    for i in range(len(CENSUS_2021_VARIABLES)):
        layer = by.values[i]
        assert np.isfinite(layer).all() and (layer >= 0).all()
        # each layer sums to its cell's reconciled value where the census gives one
        ok = known & np.isfinite(census_by[i])
        np.testing.assert_allclose(cells(layer)[ok], census_by[i][ok], rtol=1e-3, atol=1e-3)
    # where the published breakdown adds up to the total, the layer is the published value
    grid_cells = _published(table, ds)
    for members in (["M", "F"], ["Y_LT15", "Y_1564", "Y_GE65"]):
        adds_up = grid_cells[members].sum(axis=1) == grid_cells["TOT_P_2021"]
        assert adds_up.sum() > 3
        for m in members:
            i = list(CENSUS_2021_VARIABLES).index(m)
            got = cells(by.values[i])[grid_cells.row[adds_up], grid_cells.col[adds_up]]
            np.testing.assert_allclose(got, grid_cells.loc[adds_up, m], rtol=1e-3, atol=1e-3)
        # pixel by pixel, a breakdown's layers add up to the population layer
        idx = [list(CENSUS_2021_VARIABLES).index(m) for m in members]
        np.testing.assert_allclose(by.values[idx].sum(axis=0), pop, rtol=1e-4, atol=1e-6)
    assert ds.census_by.attrs["reconciled"] > 0


def _published(table: pd.DataFrame, ds) -> pd.DataFrame:
    """The census file's rows of known cells, with their row and column in the store."""
    from popdask.census import parse_grd_id

    ids = parse_grd_id(table["GRD_ID"])
    x0, y1 = float(ds.x_cell.values[0]) - 500, float(ds.y_cell.values[0]) + 500
    out = table.assign(
        col=((ids["x_llc"] - x0) // 1000).astype(int),
        row=((y1 - 1000 - ids["y_llc"]) // 1000).astype(int),
    )
    inside = out.row.between(0, ds.sizes["y_cell"] - 1) & out.col.between(0, ds.sizes["x_cell"] - 1)
    return out[inside & (out.CONFIDENTIALSTATUS == 0)].reset_index(drop=True)


def test_a_column_the_file_lacks_is_refused_before_the_run(
    tmp_path, demo_region, dask_cluster, capsys
):
    cfg = write_config(
        tmp_path, url="http://127.0.0.1:1", census=demo_region.census, address=dask_cluster
    )
    argv = ["run", str(cfg), "--set", "census.columns=[M, AGE_90]"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no column 'AGE_90' to map" in err and "census.columns" in err
    assert not (tmp_path / "out.zarr").exists()
