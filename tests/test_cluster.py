"""popdask's local cluster: what its workers start with."""

from __future__ import annotations

import os

from popdask.cluster import WORKER_MALLOC, get_client
from popdask.config import ClusterConfig

CFG = ClusterConfig(kind="local", workers=1, threads_per_worker=1)


def _malloc_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in WORKER_MALLOC}


def test_local_workers_start_with_popdasks_allocator_settings(monkeypatch):
    # what a LocalCluster with distributed's defaults leaves in this process's environment
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    for k in set(WORKER_MALLOC) - {"MALLOC_TRIM_THRESHOLD_"}:
        monkeypatch.delenv(k, raising=False)
    with get_client(CFG) as client:
        (seen,) = client.run(_malloc_env).values()
    assert seen == WORKER_MALLOC
    # and the environment of this process is as it was
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert not set(WORKER_MALLOC) - {"MALLOC_TRIM_THRESHOLD_"} & set(os.environ)


def test_a_users_allocator_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    for k in set(WORKER_MALLOC) - {"MALLOC_TRIM_THRESHOLD_"}:
        monkeypatch.delenv(k, raising=False)
    with get_client(CFG) as client:
        (seen,) = client.run(_malloc_env).values()
    assert seen.pop("MALLOC_TRIM_THRESHOLD_") == "131072"
    assert set(seen.values()) == {None}  # nothing of ours added
