"""Shared fixtures: a generated demo region, its real STAC API, a real dask cluster.

Integration tests start the real software on loopback (rustac's STAC API, a dask
LocalCluster) and stop it afterwards; nothing is mocked.
"""

from __future__ import annotations

import pytest

CONFIG = """\
region: {{bbox: [4321000, 3210000, 4327000, 3216000]}}
grid: {{resolution: 20, cell: 1000, tile: 3000}}
stac: {{url: "{url}"}}
sources:
  sentinel2:
    collection: sentinel-2-l2a
    datetime: 2021-06-01/2022-10-31
    months: [6, 7, 8, 9, 10]
    assets: [B01, B02, B03, B04, B05, B06, B07, B08, B8A, B11, B12]
    mask_asset: SCL
    max_cloud_cover: 80
  sentinel1: {{collection: sentinel-1-rtc, datetime: 2021-01-01/2021-12-31, assets: [vv, vh]}}
  nightlights:
    url: "{url}"
    collection: viirs-nightlights
    datetime: 2021-01-01/2021-12-31
    assets: [avg_rad]
census: {{path: "{census}", column: TOT_P_2021}}
model: {{components: 8, clusters: 20, sample_pixels: 40000, seed: 0}}
regression: {{rescale: true, smooth_sigma: 3, terms: [intensity, context]}}
output: {{path: out.zarr{output_extra}}}
cluster: {cluster}
"""


def write_config(directory, *, url, census, address=None, cluster=None, output_extra=""):
    """Write the hand-written run configuration above into ``directory``; return its path.

    ``cluster`` is the YAML of the cluster section; by default the scheduler at ``address``.
    """
    if cluster is None:
        cluster = f'{{kind: address, address: "{address}"}}'
    path = directory / "my.yaml"
    path.write_text(
        CONFIG.format(url=url, census=census, cluster=cluster, output_extra=output_extra)
    )
    return path


# A small region: 6 × 6 km cut in four 3 km tiles (36 census cells).
SMALL_BBOX = (4321000, 3210000, 4327000, 3216000)


@pytest.fixture(scope="session")
def demo_region(tmp_path_factory):
    """A generated region (COGs, STAC items, census, truth) shared by the session."""
    from popdask.synthetic import make_demo_region

    return make_demo_region(tmp_path_factory.mktemp("region"), bbox=SMALL_BBOX, seed=3)


@pytest.fixture(scope="session")
def stac_api(demo_region):
    """A real STAC API (rustac serve) over the demo region, on a free loopback port."""
    from popdask.stac_server import StacServer

    with StacServer(
        list(demo_region.collections.values()),
        list(demo_region.items.values()),
        cwd=demo_region.root,
    ) as server:
        yield server.url


@pytest.fixture(scope="session")
def dask_cluster():
    """A real LocalCluster (2 worker processes × 1 thread); yields its scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        memory_limit="4GiB",
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory, demo_region, stac_api, dask_cluster):
    """`popdask run my.yaml` once, uninterrupted; returns the config path (store beside it)."""
    from popdask import cli

    path = write_config(
        tmp_path_factory.mktemp("run"),
        url=stac_api,
        census=demo_region.census,
        address=dask_cluster,
    )
    assert cli.main(["run", str(path)]) == 0
    return path
