"""The demo: generate a region, serve it through a real STAC API, run the real pipeline.

Nothing in the run knows it is talking to a demo: the configuration built here points
popdask at the loopback STAC API by URL, with the collection names and asset keys of
Planetary Computer, exactly as a user's YAML would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from popdask.config import Config, config_from_dict
from popdask.pipeline import RunResult, run
from popdask.stac_server import StacServer
from popdask.synthetic import CENSUS_2021_VARIABLES, DemoRegion, make_demo_region

log = logging.getLogger(__name__)

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


def demo_bbox(size_km: int, origin=(4321000, 3210000)) -> tuple[int, int, int, int]:
    """A ``size_km`` square demo region (EPSG:3035) with its lower-left corner at ``origin``."""
    if size_km < 2:
        raise ValueError(f"the demo region must be at least 2 km wide, got {size_km}")
    x0, y0 = origin
    return (x0, y0, x0 + size_km * 1000, y0 + size_km * 1000)


def demo_config(
    region: DemoRegion, stac_url: str, out_dir: Path, **overrides: Any
) -> dict[str, Any]:
    """The run configuration (as a YAML-able dict) for a generated region behind ``stac_url``."""
    cfg = {
        "region": {"bbox": list(region.bbox)},
        "grid": {"resolution": 20, "cell": 1000, "tile": 10000},
        "stac": {"url": stac_url},
        "sources": {
            "sentinel2": {
                "collection": "sentinel-2-l2a",
                "datetime": "2021-06-01/2022-10-31",
                "months": [6, 7, 8, 9, 10],
                "assets": S2_BANDS,
                "mask_asset": "SCL",
                "max_cloud_cover": 80,
            },
            "sentinel1": {
                "collection": "sentinel-1-rtc",
                "datetime": "2021-01-01/2021-12-31",
                "assets": ["vv", "vh"],
            },
            "nightlights": {
                "collection": "viirs-nightlights",
                "datetime": "2021-01-01/2021-12-31",
                "assets": ["avg_rad"],
            },
        },
        "census": {
            "path": str(region.census),
            "column": "TOT_P_2021",
            "columns": list(CENSUS_2021_VARIABLES),  # each one a layer of population_by
        },
        "model": {"sample_pixels": 200_000, "seed": 0},
        "regression": {"rescale": True, "bootstrap": 20},  # intervals: popdask.uncertainty
        "output": {"path": str(out_dir / "popdask-demo.zarr")},
        "cluster": {"kind": "local", "workers": 2, "threads_per_worker": 1},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    return cfg


def read_truth(region: DemoRegion) -> np.ndarray:
    """The true persons per pixel of a generated region."""
    import rasterio

    with rasterio.open(region.truth) as src:
        return src.read(1).astype(np.float64)


def run_demo(
    out_dir: str | Path = "popdask-demo",
    *,
    size_km: int = 20,
    seed: int = 0,
    client=None,
    progress: bool = True,
    overrides: list[str] = (),
) -> tuple[RunResult, Config]:
    """Generate, serve and run the demo region end to end.

    Parameters
    ----------
    out_dir
        Folder for the generated data, the store, ``metrics.json`` and ``quicklook.png``.
        An existing demo store there is resumed.
    size_km
        Side of the square region.
    seed
        Seed of the generated region.
    client
        A dask client to use; by default a local cluster is started.
    progress
        Show progress bars.
    overrides
        ``section.key=value`` overrides of the run configuration.

    Returns
    -------
    (RunResult, Config)
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("demo: generating a %d km region in %s", size_km, out_dir / "data")
    region = make_demo_region(out_dir / "data", bbox=demo_bbox(size_km), seed=seed)
    colls = list(region.collections.values())
    items = list(region.items.values())
    with StacServer(colls, items, cwd=region.root) as server:
        log.info("demo: STAC API at %s", server.url)
        data = demo_config(region, server.url, out_dir)
        cfg = config_from_dict(data, overrides=list(overrides), name="demo")
        (out_dir / "demo.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        result = run(
            cfg, client=client, progress=progress, truth=read_truth(region), report_dir=out_dir
        )
    return result, cfg
