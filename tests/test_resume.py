"""A run killed mid-way (the process, with SIGKILL) and restarted ends with the same store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
from conftest import write_config

from popdask import store
from popdask.config import load_config
from popdask.pipeline import run

pytestmark = pytest.mark.integration

PASS_CODE = {"composite": store.COMPOSITED, "label": store.LABELLED, "predict": store.COMPLETE}


def _status(path: str) -> np.ndarray | None:
    try:
        return store.tile_status(path)
    except Exception:  # the store is not created yet
        return None


def test_killed_run_restarts_to_the_same_store(
    tmp_path, demo_region, stac_api, dask_cluster, clean_run
):
    cfg_path = write_config(
        tmp_path,
        url=stac_api,
        census=demo_region.census,
        address=dask_cluster,
        output_extra=", version: v1",
    )
    cfg = load_config(cfg_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "popdask.cli", "run", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = _status(cfg.output.store)
            if st is not None and (st > 0).any():  # at least one tile written
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the run wrote no tile within 300 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    from distributed import Client

    # the tasks mark their own tiles: those in flight when the client died may still finish
    # (nothing is lost), so the store is read once the cluster has let go of them
    with Client(dask_cluster) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = client.run(lambda dask_worker: len(dask_worker.state.executing))
            if not any(client.processing().values()) and not any(running.values()):
                break
            time.sleep(0.1)
    before = store.tile_status(cfg.output.store)
    assert not (before == store.COMPLETE).all(), "killed too late: the run had finished"
    # a killed run never publishes its version
    assert not (tmp_path / "out.zarr" / "latest.json").exists()

    with Client(dask_cluster) as client:
        result = run(cfg, client=client, progress=False)

    tiles = {t.id: t for t in cfg.make_grid().tiles()}
    for name, code in PASS_CODE.items():
        done_before = {i for i, t in tiles.items() if before[t.row, t.col] >= code}
        assert not done_before & set(result.computed_tiles[name]), f"{name} recomputed done tiles"
        assert set(result.computed_tiles[name]) | done_before == set(tiles)
    assert (store.tile_status(cfg.output.store) == store.COMPLETE).all()

    latest = json.loads((tmp_path / "out.zarr" / "latest.json").read_text())
    assert latest["version"] == "v1"
    assert store.latest(str(tmp_path / "out.zarr")) == cfg.output.store

    clean = xr.open_zarr(clean_run.parent / "out.zarr")
    resumed = xr.open_zarr(store.latest(str(tmp_path / "out.zarr")))
    for var in ("composite", "cluster", "census"):
        np.testing.assert_array_equal(resumed[var].values, clean[var].values, err_msg=var)
    for var in ("population", "density", "predicted"):
        np.testing.assert_allclose(
            resumed[var].values, clean[var].values, rtol=1e-5, atol=1e-6, err_msg=var
        )
