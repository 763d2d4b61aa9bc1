"""Getting a dask Client: local (default), an existing scheduler, Dask Gateway, Kubernetes.

:func:`get_client` is a context manager yielding a connected :class:`distributed.Client`
and closing (and, when asked, shutting down) what it started. Anything the configuration
leaves out falls back to the dask / dask-gateway configuration the environment holds
(as on a daskhub). Credentials never come from the run configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client

from popdask.config import ClusterConfig

log = logging.getLogger(__name__)


def local_defaults(cfg: ClusterConfig) -> dict:
    """LocalCluster keyword arguments from the config or from the machine."""
    cores = os.cpu_count() or 1
    workers = cfg.workers or max(1, min(cores, 8))
    threads = cfg.threads_per_worker or max(1, cores // workers)
    kw = {"n_workers": workers, "threads_per_worker": threads, "processes": True}
    if cfg.memory_limit:
        kw["memory_limit"] = cfg.memory_limit
    return kw


@contextmanager
def get_client(cfg: ClusterConfig | None = None) -> Iterator[Client]:
    """Connect to (or start) the cluster the configuration names.

    Parameters
    ----------
    cfg
        The ``cluster`` section; None means a local cluster sized from the machine.

    Yields
    ------
    distributed.Client
    """
    cfg = cfg or ClusterConfig()
    if cfg.kind == "local":
        from distributed import LocalCluster

        with LocalCluster(dashboard_address=":0", **local_defaults(cfg)) as cluster:
            with Client(cluster) as client:
                _announce(client)
                yield client
    elif cfg.kind == "address":
        with Client(cfg.address) as client:
            _announce(client)
            yield client
    elif cfg.kind == "gateway":
        yield from _gateway(cfg)
    elif cfg.kind == "kubernetes":
        yield from _kubernetes(cfg)
    else:  # pragma: no cover - the config validates kind
        raise ValueError(f"unknown cluster kind {cfg.kind!r}")


def _gateway(cfg: ClusterConfig) -> Iterator[Client]:
    try:
        from dask_gateway import Gateway
    except ImportError as e:
        raise ImportError(
            "cluster.kind 'gateway' needs dask-gateway: pip install dask-gateway"
        ) from e
    gateway = Gateway(address=cfg.address, proxy_address=cfg.proxy_address, auth=cfg.auth)
    cluster = gateway.new_cluster(**cfg.options)
    try:
        if cfg.adaptive:
            cluster.adapt(**cfg.adaptive)
        elif cfg.workers:
            cluster.scale(cfg.workers)
        with cluster.get_client() as client:
            _announce(client)
            yield client
    finally:
        if cfg.shutdown_on_exit:
            cluster.shutdown()
        else:
            log.info("leaving gateway cluster %s running", cluster.name)
        gateway.close()


def _kubernetes(cfg: ClusterConfig) -> Iterator[Client]:
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as e:
        raise ImportError(
            "cluster.kind 'kubernetes' needs dask-kubernetes: pip install dask-kubernetes"
        ) from e
    kw = {"n_workers": cfg.workers or 1}
    if cfg.image:
        kw["image"] = cfg.image
    if cfg.resources:
        kw["resources"] = cfg.resources
    if cfg.namespace:
        kw["namespace"] = cfg.namespace
    cluster = KubeCluster(name="popdask", shutdown_on_close=cfg.shutdown_on_exit, **kw)
    try:
        if cfg.adaptive:
            cluster.adapt(**cfg.adaptive)
        with Client(cluster) as client:
            _announce(client)
            yield client
    finally:
        cluster.close()


def _announce(client: Client) -> None:
    kw = {"n_workers": -1} if _takes_n_workers(client) else {}
    info = client.scheduler_info(**kw)
    n = len(info.get("workers", {}))
    log.info("dask: %d workers, dashboard %s", n, client.dashboard_link)


def _takes_n_workers(client: Client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters
