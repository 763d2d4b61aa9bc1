"""`popdask demo`: generate → serve over a real STAC API → run → report, on a small region."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import xarray as xr

from popdask import cli
from popdask.config import load_config

pytestmark = pytest.mark.integration


def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--size-km",
        "4",
        "--out",
        str(out),
        "--set",
        "grid.tile=2000",
        "--set",
        "model.clusters=20",
        "--set",
        "model.sample_pixels=30000",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "r2_100m_truth" in printed and "popdask-demo.zarr" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    # the truth is known: the 100 m map must carry real information, totals must hold
    assert metrics["r2_100m_truth"] > 0.5
    assert abs(metrics["total_error_known_cells"]) < 1e-4
    assert abs(metrics["total_error_truth"]) < 0.05
    # 4 km is one 5 km block: no out-of-fold error, so no intervals (not NaN figures)
    assert not any(k.startswith("interval_") for k in metrics)
    assert (out / "quicklook.png").stat().st_size > 10_000
    ds = xr.open_zarr(out / "popdask-demo.zarr")
    assert ds.population.rio.crs.to_epsg() == 3035 and ds.sizes["y"] == 200
    # the census lists populated cells only: the cells it leaves out are uninhabited, so the
    # map must put (next to) nobody there (issue 19: with absent cells unknown it put people
    # there)
    with rasterio.open(out / "data" / "truth.tif") as src:
        truth = src.read(1).astype(np.float64).reshape(4, 50, 4, 50).sum(axis=(1, 3))
    pop = ds.population.values.astype(np.float64).reshape(4, 50, 4, 50).sum(axis=(1, 3))
    empty = np.rint(truth) == 0
    assert empty.sum() >= 3 and ds.census.attrs["cells_absent_zero"] == empty.sum()
    assert pop[empty].sum() <= 1e-3 * pop.sum()
    # the configuration the demo ran is written out and is a valid run configuration
    cfg = load_config(out / "demo.yaml")
    assert cfg.stac.url.startswith("http://127.0.0.1:")
    assert cfg.sources.sentinel2.collection == "sentinel-2-l2a"
