"""Tests for popdask.plot: quicklook figures and the scatter plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import xarray as xr

from popdask.plot import choose_windows, quicklook, r_squared, scatter

X0, YTOP = 4_321_000.0, 3_222_000.0  # region corner (EPSG:3035 m), on the 1 km grid
SIZE_KM = 12
RES = 20.0
TOWN = (X0 + 7_400.0, YTOP - 4_600.0)  # centre of the synthetic town


def _census_da(values: np.ndarray, x0: float = X0, ytop: float = YTOP) -> xr.DataArray:
    ny, nx = values.shape
    return xr.DataArray(
        values.astype("float32"),
        dims=("y_cell", "x_cell"),
        coords={
            "y_cell": ytop - 500.0 - 1000.0 * np.arange(ny),
            "x_cell": x0 + 500.0 + 1000.0 * np.arange(nx),
        },
    )


@pytest.fixture(scope="module")
def run_ds() -> xr.Dataset:
    """12 x 12 km, 600 x 600 px: a Gaussian town on fields, following the output contract."""
    n = int(SIZE_KM * 1000 / RES)
    x = X0 + RES / 2 + RES * np.arange(n)
    y = YTOP - RES / 2 - RES * np.arange(n)
    xx, yy = np.meshgrid(x, y)
    r2 = ((xx - TOWN[0]) ** 2 + (yy - TOWN[1]) ** 2) / 1200.0**2
    rng = np.random.default_rng(1)
    urban = np.exp(-r2 / 2)
    population = (urban * 6.0 * rng.gamma(2.0, 0.5, size=urban.shape)).astype("float32")
    population[urban < 0.02] = 0.0

    # Density: a cheap smoothing (2 x 2 px box) of persons per km² is enough for a figure.
    per_km2 = population / (RES * RES / 1e6)
    density = (per_km2 + np.roll(per_km2, 1, 0) + np.roll(per_km2, 1, 1)) / 3
    bands = ["B02", "B03", "B04", "B08"]
    base = np.array([0.04, 0.07, 0.05, 0.30])[:, None, None]
    built = np.array([0.10, 0.11, 0.12, 0.15])[:, None, None]
    fields = 0.02 * (np.sin(xx / 400.0) > 0)[None]
    composite = (base * (1 - urban) + built * urban + fields).astype("float32")
    composite += rng.normal(0, 0.005, composite.shape).astype("float32")
    composite[:, 550:, :60] = np.nan  # a nodata corner

    census = population.reshape(SIZE_KM, 50, SIZE_KM, 50).sum(axis=(1, 3))
    census_da = _census_da(census)
    census_da[0, 0] = np.nan  # an unknown cell
    cluster = (urban * 10).astype("int16")
    return xr.Dataset(
        {
            "composite": (("band", "y", "x"), composite),
            "population": (("y", "x"), population),
            "density": (("y", "x"), density.astype("float32")),
            "census": census_da,
            "cluster": (("y", "x"), cluster),
        },
        coords={"band": bands, "y": y, "x": x},
    )


# --------------------------------------------------------------------------- choose_windows
def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_choose_windows_on_town(run_ds: xr.Dataset) -> None:
    wins = choose_windows(run_ds["census"], 3, 5000.0)
    assert 1 <= len(wins) <= 3
    first = wins[0]
    assert first[0] <= TOWN[0] <= first[2] and first[1] <= TOWN[1] <= first[3]
    for w in wins:
        assert w[2] - w[0] == 5000.0 and w[3] - w[1] == 5000.0
        assert all(v % 1000.0 == 0 for v in w)  # snapped to the 1 km grid
        assert X0 <= w[0] and w[2] <= X0 + SIZE_KM * 1000
        assert YTOP - SIZE_KM * 1000 <= w[1] and w[3] <= YTOP
    for i, a in enumerate(wins):
        for b in wins[i + 1 :]:
            assert not _overlap(a, b)


def test_choose_windows_greedy_order_and_limits() -> None:
    values = np.zeros((10, 10))
    values[1, 1] = 100.0  # top-left: the biggest place
    values[8, 8] = 50.0  # bottom-right
    census = _census_da(values)
    wins = choose_windows(census, 5, 3000.0)
    assert len(wins) == 2  # only two populated places; empty windows are not added
    cell_of = {(float(census.x_cell[j]), float(census.y_cell[i])) for i, j in [(1, 1)]}
    (cx, cy) = next(iter(cell_of))
    assert wins[0][0] < cx < wins[0][2] and wins[0][1] < cy < wins[0][3]
    assert wins[1][0] < float(census.x_cell[8]) < wins[1][2]
    assert not _overlap(*wins)

    # Windows larger than the region shrink to it; 2.5 km rounds up to 3 cells.
    assert choose_windows(census, 3, 50_000.0) == [(X0, YTOP - 10_000, X0 + 10_000, YTOP)]
    w = choose_windows(census, 1, 2500.0)[0]
    assert w[2] - w[0] == 3000.0

    # No population at all (zeros and NaN): still one window.
    empty = _census_da(np.full((4, 6), np.nan))
    assert len(choose_windows(empty, 3, 2000.0)) == 1

    with pytest.raises(ValueError, match="dims"):
        choose_windows(census.rename(y_cell="y"), 1, 1000.0)
    with pytest.raises(ValueError):
        choose_windows(census, 0, 1000.0)


def test_choose_windows_ascending_y() -> None:
    values = np.zeros((6, 6))
    values[5, 0] = 10.0
    census = _census_da(values).isel(y_cell=slice(None, None, -1))  # y ascending
    (w,) = choose_windows(census, 1, 2000.0)
    x, y = float(census.x_cell[0]), float(census.y_cell[0])
    assert w[0] < x < w[2] and w[1] < y < w[3]


# --------------------------------------------------------------------------- quicklook
def _panel_boxes(img: np.ndarray, rows: int) -> list[np.ndarray]:
    h, w = img.shape[:2]
    return [
        img[r * h // rows : (r + 1) * h // rows, c * w // 3 : (c + 1) * w // 3]
        for r in range(rows)
        for c in range(3)
    ]


def test_quicklook_auto_windows(run_ds: xr.Dataset, tmp_path: Path) -> None:
    out = quicklook(run_ds, tmp_path / "figs" / "quicklook.png", n_windows=2, dpi=80)
    assert out == tmp_path / "figs" / "quicklook.png" and out.exists()
    img = mpimg.imread(out)
    h, w = img.shape[:2]
    assert 1000 <= w <= 1400  # 15.5 in at 80 dpi
    assert 500 <= h <= 2 * 4.7 * 80 + 10
    for box in _panel_boxes(img[..., :3], 2):
        assert box.var() > 1e-4


def test_quicklook_explicit_windows_lazy(run_ds: xr.Dataset, tmp_path: Path) -> None:
    lazy = run_ds.chunk({"y": 200, "x": 200})
    # Partly outside the region: clipped; a non-square window is fine.
    wins = [(X0 - 2000.0, YTOP - 3000.0, X0 + 4000.0, YTOP + 1000.0)]
    out = quicklook(lazy, tmp_path / "q.png", windows=wins, dpi=60)
    img = mpimg.imread(out)
    for box in _panel_boxes(img[..., :3], 1):
        assert box.var() > 1e-4

    with pytest.raises(ValueError, match="outside the region"):
        quicklook(run_ds, tmp_path / "x.png", windows=[(0.0, 0.0, 1000.0, 1000.0)])


def test_quicklook_missing_band(run_ds: xr.Dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"B05.*B02.*B03.*B04.*B08"):
        quicklook(run_ds, tmp_path / "q.png", rgb=("B05", "B03", "B02"))
    with pytest.raises(ValueError, match="density"):
        quicklook(run_ds.drop_vars("density"), tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


# --------------------------------------------------------------------------- scatter
def test_scatter_and_r_squared(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    observed = rng.lognormal(5, 1.5, size=500)
    observed[:20] = 0.0
    predicted = observed * rng.lognormal(0, 0.3, size=500)
    observed[5] = np.nan
    out = scatter(observed, predicted, tmp_path / "s" / "scatter.png", title="test")
    assert out.exists()
    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img[..., :3].var() > 1e-4
    out2 = scatter(observed, predicted, tmp_path / "lin.png", log=False)
    assert out2.exists()

    assert r_squared([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert r_squared([1, 2, 3, np.nan], [1, 2, 4, 5]) == pytest.approx(1 - 1 / 2)
    assert np.isnan(r_squared([1.0], [1.0]))
    with pytest.raises(ValueError, match="shape"):
        scatter([1, 2], [1, 2, 3], tmp_path / "bad.png")


def test_choose_windows_blockwise_loads_a_block_at_a_time() -> None:
    """Over a lazy census of 5 x 5 blocks, the windows of the most populated places are the
    same as choose_windows finds on the whole array, and no load is larger than a block."""
    import dask.array as da

    from popdask.plot import choose_windows_blockwise

    rng = np.random.default_rng(2)
    values = rng.gamma(0.3, 20.0, (50, 50))
    for i, j, v in ((3, 4, 5e4), (27, 31, 3e4), (44, 12, 2e4)):  # three towns inside blocks
        values[i - 1 : i + 2, j - 1 : j + 2] += v
    census = _census_da(values)
    loads = []

    def spy(block):
        loads.append(block.size)
        return block

    lazy = census.copy(data=da.from_array(values, chunks=10).map_blocks(spy))
    got = choose_windows_blockwise(lazy, 3, 3000.0, block=10)
    assert got == choose_windows(census, 3, 3000.0)
    assert loads and max(loads) <= 100  # never more than a block of 10 x 10 cells
