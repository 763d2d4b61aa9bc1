"""Faults on real servers: a worker killed mid-pass, and the run still ends equal to a
clean run's (the STAC API answering 429/503, storage answering 503 or 404, a COG that
cannot be read: tests/test_catalog.py, test_chunkio.py, test_cloud.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import xarray as xr
from conftest import write_config

from popdask import store
from popdask.config import load_config
from popdask.pipeline import run

pytestmark = pytest.mark.integration


def test_a_worker_killed_mid_pass_and_the_run_ends_equal_to_a_clean_run(
    tmp_path, demo_region, stac_api, clean_run
):
    """SIGKILL to a worker process while the composite pass runs: its tasks go to the other
    worker (and the one its nanny restarts), and the store equals the clean run's."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
            memory_limit="4GiB",
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        cfg_path = write_config(
            tmp_path, url=stac_api, census=demo_region.census, address=cluster.scheduler_address
        )
        cfg = load_config(cfg_path)
        pids = [p for p in client.run(os.getpid).values()]
        killed = threading.Event()

        def kill_when_busy():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed.is_set():
                busy = [w for w, tasks in client.processing().items() if tasks]
                if busy:
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        result = run(cfg, client=client, progress=False, report_dir=tmp_path)
        killer.join(timeout=5)
        assert killed.is_set(), "no worker was busy to kill"
        assert set(client.run(os.getpid).values()) != set(pids)  # one was replaced
    assert (store.tile_status(cfg.output.store) == store.COMPLETE).all()
    assert result.metrics["total_error_known_cells"] == pytest.approx(0, abs=1e-6)
    clean = xr.open_zarr(clean_run.parent / "out.zarr")
    got = xr.open_zarr(cfg.output.store)
    for var in ("composite", "cluster", "census"):
        np.testing.assert_array_equal(got[var].values, clean[var].values, err_msg=var)
    for var in ("population", "density", "predicted"):
        np.testing.assert_allclose(
            got[var].values, clean[var].values, rtol=1e-5, atol=1e-6, err_msg=var
        )
