"""popdask's local cluster: what its workers start with."""

from __future__ import annotations

import os

from popdask.cluster import WORKER_MALLOC, get_client
from popdask.config import ClusterConfig

CFG = ClusterConfig(kind="local", workers=1, threads_per_worker=1)


def _malloc_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in WORKER_MALLOC}


def _workers_env(monkeypatch, trim: str) -> dict[str, str | None]:
    """The allocator settings a popdask local worker starts with, when this process's
    environment holds ``MALLOC_TRIM_THRESHOLD_=trim`` and none of the others."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", trim)
    for k in set(WORKER_MALLOC) - {"MALLOC_TRIM_THRESHOLD_"}:
        monkeypatch.delenv(k, raising=False)
    with get_client(CFG) as client:
        (seen,) = client.run(_malloc_env).values()
    return seen


def test_local_workers_start_with_popdasks_allocator_settings(monkeypatch):
    # 65536: what a LocalCluster with distributed's defaults leaves in this environment
    assert _workers_env(monkeypatch, "65536") == WORKER_MALLOC
    # and the environment of this process is as it was
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert not set(WORKER_MALLOC) - {"MALLOC_TRIM_THRESHOLD_"} & set(os.environ)


def test_a_users_allocator_setting_wins(monkeypatch):
    seen = _workers_env(monkeypatch, "131072")
    assert seen.pop("MALLOC_TRIM_THRESHOLD_") == "131072"
    assert set(seen.values()) == {None}  # nothing of ours added


def test_release_memory_hands_freed_heap_back(tmp_path):
    """With a trim threshold that keeps freed blocks (as WORKER_MALLOC does), memory a task
    freed stays with the process until release_memory hands it back."""
    import subprocess
    import sys

    code = """
import numpy as np, psutil
from popdask.cluster import release_memory
rss = lambda: psutil.Process().memory_info().rss / 2**20
blocks = [np.ones(2**20 // 8) for _ in range(300)]  # 300 MB of 1 MB blocks, on the heap
del blocks
kept = rss()
release_memory()
print(kept, rss())
"""
    env = {
        **os.environ,
        "MALLOC_TRIM_THRESHOLD_": str(2**30),
        "MALLOC_MMAP_THRESHOLD_": str(2**25),
        "MALLOC_ARENA_MAX": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    kept, after = map(float, out.stdout.split())
    assert kept - after > 200, (kept, after)


def _profiler_enabled() -> bool:
    import dask

    return dask.config.get("distributed.worker.profile.enabled")


def test_local_workers_run_without_the_profiler():
    before = _profiler_enabled()
    with get_client(CFG) as client:
        (enabled,) = client.run(_profiler_enabled).values()
        # and the worker collects no profile while a task runs
        client.submit(sum, range(10**7), pure=False).result()
        (profile,) = client.run(lambda dask_worker: dask_worker.profile_keys).values()
    assert enabled is False and not profile
    assert _profiler_enabled() == before  # this process's configuration is as it was


def test_a_user_keeps_the_profiler_with_the_environment(monkeypatch):
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "True")
    with get_client(CFG) as client:
        (enabled,) = client.run(_profiler_enabled).values()
    assert enabled is True


def test_the_local_cluster_listens_on_loopback_only():
    """The scheduler, its dashboard and the workers bind 127.0.0.1, never every interface."""
    import psutil

    def listening() -> set:
        conns = psutil.Process().net_connections(kind="tcp")
        return {c.laddr for c in conns if c.status == psutil.CONN_LISTEN}

    before = listening()  # what other tests of this process left listening
    with get_client(CFG) as client:
        port = int(client.dashboard_link.split(":")[2].split("/")[0])
        opened = listening() - before
        workers = list(client.scheduler_info()["workers"])
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    dashboard = [a for a in opened if a.port == port]
    assert dashboard and all(a.ip == "127.0.0.1" for a in dashboard)
    assert all(a.ip in ("127.0.0.1", "::1") for a in opened), opened
    assert workers and all(w.startswith("tcp://127.0.0.1:") for w in workers)
