"""Shared fixtures: a generated demo region, its real STAC API, a real dask cluster.

Integration tests start the real software on loopback (rustac's STAC API, a dask
LocalCluster) and stop it afterwards; nothing is mocked.
"""

from __future__ import annotations

import pytest

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
        list(demo_region.collections.values()), list(demo_region.items.values()),
        cwd=demo_region.root,
    ) as server:  # fmt: skip
        yield server.url


@pytest.fixture(scope="session")
def dask_cluster():
    """A real LocalCluster (2 worker processes × 1 thread); yields its scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        memory_limit="4GiB",
    ) as cluster:  # fmt: skip
        yield cluster.scheduler_address
