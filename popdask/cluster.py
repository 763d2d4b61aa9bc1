"""Getting a dask Client: local (default), an existing scheduler, Dask Gateway, Kubernetes.

:func:`get_client` is a context manager yielding a connected :class:`distributed.Client`
and closing (and, when asked, shutting down) what it started. Anything the configuration
leaves out falls back to the dask / dask-gateway configuration the environment holds
(as on a daskhub). Credentials never come from the run configuration, and are never
logged nor put in an error message.

Dask Gateway credentials are read the way dask-gateway reads them, from its section of the
dask configuration, which the environment fills in::

    DASK_GATEWAY__AUTH__TYPE=basic                 # or cluster.auth in the YAML
    DASK_GATEWAY__AUTH__KWARGS__USERNAME=alice
    DASK_GATEWAY__AUTH__KWARGS__PASSWORD=...
    JUPYTERHUB_API_TOKEN=...                       # auth: jupyterhub (set on a daskhub)

Two departures from plain dask-gateway, both so that the environment at connection time is
what counts: ``DASK_GATEWAY__*`` variables are re-read when the cluster is requested (dask
reads the environment only once, on import), and credential values (``username``,
``password``, ``api_token``) are taken as the variable's text (dask would turn
``PASSWORD=12345`` into a number, which dask-gateway's BasicAuth cannot send).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import dask
from distributed import Client

from popdask.config import ClusterConfig

if TYPE_CHECKING:  # pragma: no cover
    from dask_gateway import Gateway, GatewayCluster
    from dask_gateway.options import Options

log = logging.getLogger(__name__)

#: Seconds to wait for a gateway cluster to start and for its first worker to join, unless
#: the configuration (``cluster.timeout``) or the caller says otherwise.
DEFAULT_TIMEOUT = 300.0

#: Authentication keyword arguments that hold text (dask-gateway's built-in auth classes).
_TEXT_AUTH_KWARGS = ("username", "password", "api_token")


class ClusterError(RuntimeError):
    """A cluster could not be reached, authenticated, started or sized.

    The message names the setting to check; it never contains credentials.
    """


# --------------------------------------------------------------------------------------
# The context manager
# --------------------------------------------------------------------------------------
@contextmanager
def get_client(
    cfg: ClusterConfig | None = None, *, timeout: float | None = None
) -> Iterator[Client]:
    """Connect to (or start) the cluster the configuration names.

    Parameters
    ----------
    cfg
        The ``cluster`` section; None means a local cluster sized from the machine.
    timeout
        Seconds to wait for a started cluster (gateway) and its first worker; default the
        configuration's ``cluster.timeout`` when it has one, else :data:`DEFAULT_TIMEOUT`.

    Yields
    ------
    distributed.Client
        Connected, set as the default client, closed on exit.

    Raises
    ------
    ClusterError
        When the scheduler cannot be reached, the gateway refuses the credentials or an
        option, or no worker joins in time.
    """
    cfg = cfg or ClusterConfig()
    if timeout is None:
        timeout = getattr(cfg, "timeout", None) or DEFAULT_TIMEOUT
    if cfg.kind == "local":
        yield from _local(cfg)
    elif cfg.kind == "address":
        yield from _address(cfg)
    elif cfg.kind == "gateway":
        yield from _gateway(cfg, timeout)
    elif cfg.kind == "kubernetes":
        yield from _kubernetes(cfg)
    else:  # pragma: no cover - the config validates kind
        raise ValueError(f"unknown cluster kind {cfg.kind!r}")


# --------------------------------------------------------------------------------------
# local, address
# --------------------------------------------------------------------------------------
def local_defaults(cfg: ClusterConfig) -> dict[str, Any]:
    """LocalCluster keyword arguments from the config or from the machine.

    Parameters
    ----------
    cfg
        The ``cluster`` section (``workers``, ``threads_per_worker``, ``memory_limit``).

    Returns
    -------
    dict
        ``n_workers``, ``threads_per_worker``, ``processes`` and, when set, ``memory_limit``.
    """
    cores = os.cpu_count() or 1
    workers = cfg.workers or max(1, min(cores, 8))
    threads = cfg.threads_per_worker or max(1, cores // workers)
    kw: dict[str, Any] = {"n_workers": workers, "threads_per_worker": threads, "processes": True}
    if cfg.memory_limit:
        kw["memory_limit"] = cfg.memory_limit
    return kw


#: The allocator settings popdask's workers start with (glibc reads them when the process
#: starts, so dask must set them before spawning: ``distributed.nanny.pre-spawn-environ``).
#: distributed's default, a trim threshold of 64 KiB, hands every freed block back to the
#: system, so each tile-sized temporary is page-faulted in afresh: measured on the 40 km
#: benchmark region, the label pass took 2.5 s and the predict pass 1.75 s with it, 1.8 s
#: and 1.2 s with a 64 MiB threshold, for about 100 MB more resident memory per worker.
#: Two arenas and a 32 MiB threshold keep what the heap holds back bounded (a worker's
#: peak grew 1.25× from the 10 to the 40 km region with 64 MiB and one arena per thread).
WORKER_MALLOC = {
    "MALLOC_TRIM_THRESHOLD_": "33554432",
    "MALLOC_MMAP_THRESHOLD_": "16777216",
    "MALLOC_ARENA_MAX": "2",
}
_DISTRIBUTED_TRIM = "65536"

#: The dask settings popdask's workers start with. distributed's statistical profiler (the
#: dashboard's Profile page) wakes every 10 ms to walk the task thread's stack, taking the
#: GIL from tasks that hand it back and forth between many NumPy calls: measured with two
#: workers labelling 500 × 500 tiles side by side, a label task took 0.153 s with it and
#: 0.105 s without (medians of 36 tasks each). Set ``DASK_DISTRIBUTED__WORKER__PROFILE__
#: ENABLED=True`` to keep the profiler.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
_PROFILE_ENV = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"


def worker_dask_config() -> dict[str, Any]:
    """:data:`WORKER_CONFIG` and :data:`WORKER_MALLOC` as one nested dask configuration (a
    worker image's YAML file, e.g. deploy/Dockerfile's ``/etc/dask/popdask.yaml``)."""
    out: dict[str, Any] = {"distributed": {"nanny": {"pre-spawn-environ": dict(WORKER_MALLOC)}}}
    for key, value in WORKER_CONFIG.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@functools.cache
def _libc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back
        return None


def release_memory() -> None:
    """Hand the free memory the heap holds back to the system (glibc ``malloc_trim``).

    The composite tasks call it as they end: with :data:`WORKER_MALLOC` a task reuses the
    blocks it frees instead of page-faulting fresh ones, and this keeps what one tile freed
    from staying with the worker (over the 16 composite tasks of the 40 km benchmark region,
    a worker's resting memory crept up 72 MB without it, 19 MB with it, as with
    distributed's settings).
    """
    trim = _libc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def worker_environ() -> Iterator[None]:
    """Within it, workers that nannies spawn get :data:`WORKER_MALLOC` and
    :data:`WORKER_CONFIG` (a spawned worker inherits the dask configuration).

    Unless the user chose otherwise: the profiler stays on when ``DASK_DISTRIBUTED__WORKER__
    PROFILE__ENABLED`` is set, and the allocator settings are left alone when the trim
    threshold is already set otherwise than distributed's default, in the environment or
    the dask configuration. distributed lets the environment win over its configuration (and
    a nanny writes its settings into the environment of the process that starts it), so both
    are set here and the environment is restored on exit.
    """
    config = {} if _PROFILE_ENV in os.environ else WORKER_CONFIG
    with dask.config.set(config), _malloc_environ():
        yield


@contextmanager
def _malloc_environ() -> Iterator[None]:
    key = "distributed.nanny.pre-spawn-environ"
    cfg = dict(dask.config.get(key, default={}) or {})
    trim = os.environ.get(
        "MALLOC_TRIM_THRESHOLD_", str(cfg.get("MALLOC_TRIM_THRESHOLD_", _DISTRIBUTED_TRIM))
    )
    if trim != _DISTRIBUTED_TRIM:
        yield
        return
    saved = {k: os.environ.get(k) for k in WORKER_MALLOC}
    os.environ.update(WORKER_MALLOC)
    try:
        with dask.config.set({key: {**cfg, **WORKER_MALLOC}}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local(cfg: ClusterConfig) -> Iterator[Client]:
    from distributed import LocalCluster

    with (
        worker_environ(),
        LocalCluster(dashboard_address=":0", **local_defaults(cfg)) as cluster,
    ):
        with Client(cluster) as client:
            _announce(client, "local cluster")
            yield client


def _address(cfg: ClusterConfig) -> Iterator[Client]:
    where = _redact(cfg.address or "")
    try:
        client = Client(cfg.address)  # dask's connect timeout (distributed.comm.timeouts)
    except OSError as e:  # includes the connection TimeoutError
        raise ClusterError(
            f"cannot reach the dask scheduler at {where} (cluster.address): {e}"
        ) from None
    with client:
        _announce(client, f"scheduler {where}")
        yield client


# --------------------------------------------------------------------------------------
# Dask Gateway
# --------------------------------------------------------------------------------------
def gateway_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """dask-gateway's section of the dask config, with the environment re-read now.

    Parameters
    ----------
    environ
        The environment to read ``DASK_GATEWAY__*`` variables from (default ``os.environ``).

    Returns
    -------
    dict
        The ``gateway`` configuration: the dask config's (defaults, YAML files, what dask
        read from the environment on import, ``dask.config.set``), overlaid with the
        ``DASK_GATEWAY__*`` variables present now; credential kwargs kept as text.
    """
    environ = os.environ if environ is None else environ
    ours = {k: v for k, v in environ.items() if k.upper().startswith("DASK_GATEWAY__")}
    from_env = dask.config.collect_env(ours).get("gateway", {})
    settings = dask.config.merge(dask.config.get("gateway", default=None) or {}, from_env)
    auth = settings.get("auth") or {}
    kwargs = dict(auth.get("kwargs") or {})
    for name, value in ours.items():
        parts = name.lower().split("__")
        if len(parts) == 4 and parts[1:3] == ["auth", "kwargs"] and parts[3] in _TEXT_AUTH_KWARGS:
            kwargs[parts[3]] = value
    settings["auth"] = {**auth, "kwargs": kwargs}
    return settings


def _secrets(settings: Mapping[str, Any]) -> list[str]:
    """The credential texts in ``settings`` (to keep them out of messages)."""
    kwargs = (settings.get("auth") or {}).get("kwargs") or {}
    found = [str(v) for v in kwargs.values() if v not in (None, "")]
    token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if token:
        found.append(token)
    return found


def _scrub(text: str, secrets: list[str]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def _redact(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<address>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


@contextmanager
def _gateway_errors(what: str, where: str, auth: str, secrets: list[str]) -> Iterator[None]:
    """Turn dask-gateway / aiohttp failures into a :class:`ClusterError` without secrets."""
    import aiohttp

    try:
        yield
    except ClusterError:
        raise
    except aiohttp.ClientResponseError as e:
        if e.status in (401, 403):
            raise ClusterError(
                f"dask-gateway at {where} refused the credentials (HTTP {e.status}) while "
                f"{what}: check the {auth!r} authentication settings (cluster.auth and the "
                "DASK_GATEWAY__AUTH__KWARGS__* environment variables, e.g. USERNAME and "
                "PASSWORD for basic auth)"
            ) from None
        raise ClusterError(
            f"dask-gateway at {where} answered HTTP {e.status} {e.message or ''} while {what}"
        ) from None
    except (aiohttp.ClientError, OSError) as e:
        detail = _scrub(str(e), secrets) or type(e).__name__
        raise ClusterError(
            f"cannot reach dask-gateway at {where} while {what} (cluster.address): {detail}"
        ) from None
    except (ValueError, TypeError) as e:  # 404/422 from the server, bad option values
        raise ClusterError(
            f"dask-gateway at {where}: {what} failed: {_scrub(str(e), secrets)}"
        ) from None


def _make_gateway(cfg: ClusterConfig, settings: dict[str, Any]) -> Gateway:
    from dask_gateway import Gateway
    from dask_gateway.auth import get_auth

    auth_name = cfg.auth or (settings.get("auth") or {}).get("type") or "basic"
    secrets = _secrets(settings)
    with dask.config.set({"gateway": settings}):
        try:
            auth = get_auth(cfg.auth)
        except ImportError:
            raise ClusterError(
                f"cluster.auth {auth_name!r}: not a dask-gateway authentication type "
                "(basic, kerberos, jupyterhub, or the full path of a GatewayAuth class)"
            ) from None
        except Exception as e:
            # the message may quote a credential (template formatting): keep only safe text
            detail = _scrub(str(e), secrets) if isinstance(e, ValueError | TypeError) else ""
            raise ClusterError(
                f"cluster.auth {auth_name!r}: cannot set up dask-gateway authentication "
                f"({type(e).__name__}{': ' + detail if detail else ''}); check the "
                "DASK_GATEWAY__AUTH__* environment variables"
            ) from None
        try:
            return Gateway(address=cfg.address, proxy_address=cfg.proxy_address, auth=auth)
        except ValueError:
            raise ClusterError(
                "cluster.kind 'gateway' needs cluster.address (or DASK_GATEWAY__ADDRESS in "
                "the environment), e.g. https://hub.example/services/dask-gateway"
            ) from None


def _cluster_options(gateway: Gateway, wanted: Mapping[str, Any], where: str) -> Options:
    """The gateway's options with ``wanted`` set; unknown names fail naming the offered ones."""
    options = gateway.cluster_options()
    offered = sorted(options)
    unknown = sorted(set(wanted) - set(offered))
    if unknown:
        raise ClusterError(
            f"cluster.options: {', '.join(map(repr, unknown))} not offered by the dask-gateway "
            f"at {where}; it offers: {', '.join(offered) or '(no options)'}"
        )
    for key, value in wanted.items():
        try:
            options[key] = value
        except (TypeError, ValueError) as e:
            raise ClusterError(f"cluster.options.{key}: {e}") from None
    return options


def close_gateway(gateway: Gateway) -> None:
    """Close a :class:`dask_gateway.Gateway` for good.

    dask-gateway 2026.3 closes a Gateway again when it is garbage-collected; with
    distributed >= 2023.6 that second close raises "Accessing the loop property while the
    loop is not running" (printed as an ignored exception). Dropping the closed gateway's
    loop runner makes ``__del__`` skip it.

    Parameters
    ----------
    gateway
        An open or closed gateway client (a GatewayCluster's ``.gateway`` too).
    """
    if hasattr(gateway, "_loop_runner"):
        gateway.close()
        with suppress(AttributeError):
            del gateway._loop_runner


def _wait_running(gateway: Gateway, name: str, deadline: float) -> None:
    """Poll the gateway until cluster ``name`` runs; fail on FAILED/STOPPED or the deadline."""
    from dask_gateway.client import ClusterStatus

    while True:
        status = gateway.get_cluster(name).status
        if status is ClusterStatus.RUNNING:
            return
        if status in (ClusterStatus.FAILED, ClusterStatus.STOPPED):
            raise ClusterError(
                f"dask-gateway cluster {name} is {status.name.lower()} before it started: "
                "see the gateway's scheduler logs"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"dask-gateway cluster {name} did not start within the timeout "
                f"(still {status.name.lower()}); raise cluster.timeout or check the gateway"
            )
        time.sleep(0.2)


def _gateway(cfg: ClusterConfig, timeout: float) -> Iterator[Client]:
    try:
        import dask_gateway  # noqa: F401
    except ImportError:
        raise ClusterError(
            "cluster.kind 'gateway' needs dask-gateway: pip install 'popdask[gateway]' "
            "(or pip install dask-gateway)"
        ) from None
    adaptive = dict(cfg.adaptive or {})
    if set(adaptive) - {"minimum", "maximum"}:
        raise ClusterError(f"cluster.adaptive takes minimum and maximum, got {sorted(adaptive)}")
    settings = gateway_settings()
    secrets = _secrets(settings)
    auth_name = cfg.auth or (settings.get("auth") or {}).get("type") or "basic"
    gateway = _make_gateway(cfg, settings)
    where = _redact(gateway.address)
    name: str | None = None
    cluster: GatewayCluster | None = None
    try:
        t0 = time.monotonic()
        deadline = t0 + timeout
        with _gateway_errors("reading its cluster options", where, auth_name, secrets):
            with dask.config.set({"gateway": settings}):  # local default options
                options = _cluster_options(gateway, cfg.options, where)
        with _gateway_errors("starting a cluster", where, auth_name, secrets):
            name = gateway.submit(cluster_options=options)
            _wait_running(gateway, name, deadline)
            cluster = gateway.connect(name, shutdown_on_close=cfg.shutdown_on_exit)
        started = time.monotonic() - t0
        log.info("dask-gateway: cluster %s running after %.2f s", name, started)
        with _gateway_errors("scaling the cluster", where, auth_name, secrets):
            if adaptive:
                cluster.adapt(**adaptive)
                wanted = adaptive.get("minimum", 0)
                log.info("dask-gateway: adaptive %s", adaptive)
            else:
                wanted = cfg.workers or 1
                cluster.scale(wanted)
                log.info("dask-gateway: asked for %d workers", wanted)
        with cluster.get_client() as client:
            if wanted > 0:
                try:
                    client.wait_for_workers(1, timeout=max(1.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise ClusterError(
                        f"no dask worker joined gateway cluster {name} within {timeout:.0f} s "
                        f"(asked for {wanted}): check the gateway's limits (cores, memory, "
                        "cluster_max_workers) and its worker logs, or raise cluster.timeout"
                    ) from None
                log.info("dask-gateway: first worker after %.2f s", time.monotonic() - t0)
            else:
                log.info("dask-gateway: adaptive from 0 workers: workers start with the work")
            _announce(client, f"dask-gateway cluster {name}")
            yield client
    finally:
        if cluster is not None:
            try:
                cluster.close(shutdown=cfg.shutdown_on_exit)
                close_gateway(cluster.gateway)
            except Exception as e:  # never hide the run's own error behind this one
                log.warning("dask-gateway: closing cluster %s: %s", name, type(e).__name__)
        elif name is not None:  # asked for but never reached: of no use to anyone
            try:
                gateway.stop_cluster(name)
            except Exception as e:
                log.warning("dask-gateway: stopping cluster %s: %s", name, type(e).__name__)
        if name is not None:
            if cfg.shutdown_on_exit or cluster is None:
                log.info("dask-gateway: cluster %s shut down", name)
            else:
                log.info(
                    "dask-gateway: leaving cluster %s running; reconnect with "
                    "dask_gateway.Gateway(%r).connect(%r), stop it with .shutdown()",
                    name,
                    where,
                    name,
                )
        close_gateway(gateway)


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------
def _kubernetes(cfg: ClusterConfig) -> Iterator[Client]:
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ClusterError(
            "cluster.kind 'kubernetes' needs dask-kubernetes: pip install dask-kubernetes"
        ) from None
    kw: dict[str, Any] = {"n_workers": cfg.workers or 1}
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
            _announce(client, f"kubernetes cluster {cluster.name}")
            yield client
    finally:
        cluster.close()


# --------------------------------------------------------------------------------------
def _announce(client: Client, what: str) -> None:
    """Log how many workers ``client`` sees and its dashboard link."""
    kw = {"n_workers": -1} if _takes_n_workers(client) else {}
    info = client.scheduler_info(**kw)
    n = len(info.get("workers", {}))
    log.info("dask: %s, %d workers, dashboard %s", what, n, _redact(client.dashboard_link or ""))


def _takes_n_workers(client: Client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters
