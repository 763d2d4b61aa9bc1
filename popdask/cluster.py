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

import asyncio
import ctypes
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
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
        Seconds to wait for a started cluster (gateway, kubernetes) and its first worker;
        default the configuration's ``cluster.timeout`` when it has one, else
        :data:`DEFAULT_TIMEOUT`.

    Yields
    ------
    distributed.Client
        Connected, set as the default client, closed on exit.

    Raises
    ------
    ClusterError
        When the scheduler cannot be reached, the gateway refuses the credentials or an
        option, no Kubernetes API (with the dask operator) answers, or the cluster or its
        first worker does not come up in time.
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
        yield from _kubernetes(cfg, timeout)
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
        LocalCluster(
            host="127.0.0.1", dashboard_address="127.0.0.1:0", **local_defaults(cfg)
        ) as cluster,
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
#: Seconds the reachability probe waits for the Kubernetes API server to answer.
KUBE_PROBE_TIMEOUT = 5.0

#: The API group of the dask-kubernetes operator's custom resources (DaskCluster, ...).
DASK_OPERATOR_GROUP = "kubernetes.dask.org"

#: The in-cluster service account's mount (what kr8s, and so dask-kubernetes, reads).
_SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

#: dask-kubernetes' limit on a DaskCluster name: 63 minus len("-scheduler").
_MAX_KUBE_NAME = 53


def kubernetes_cluster_name(prefix: str = "popdask") -> str:
    """A fresh DaskCluster name for one run: ``<prefix>-<10 random hex digits>``.

    Every run gets its own cluster, so two runs in the same namespace never connect to,
    scale or delete each other's (dask-kubernetes connects to an existing cluster of the
    same name, and deletes it when that connection closes).

    Parameters
    ----------
    prefix
        Lowercase letters, digits and ``-``, starting with a letter (``cluster.name_prefix``).

    Returns
    -------
    str
        A lowercase DNS-1123 label of at most 53 characters (dask-kubernetes appends
        ``-scheduler`` for the scheduler's Service, which must stay within 63).
    """
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    if not _KUBE_NAME.fullmatch(name) or len(name) > _MAX_KUBE_NAME:
        raise ValueError(
            f"cluster.name_prefix {prefix!r}: Kubernetes names need lowercase letters, digits "
            f"and '-', starting with a letter, and at most {_MAX_KUBE_NAME - 11} characters"
        )
    return name


_KUBE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class KubeApi:
    """A Kubernetes API server that answered, as :func:`kubernetes_api` found it.

    Attributes
    ----------
    server
        Its URL, without credentials.
    namespace
        The namespace of the configuration's context (``default`` when it names none).
    source
        Where the configuration came from (a kubeconfig path or the service account).
    """

    server: str
    namespace: str
    source: str


def kubernetes_api(
    environ: Mapping[str, str] | None = None, *, timeout: float = KUBE_PROBE_TIMEOUT
) -> KubeApi:
    """Load the Kubernetes configuration and check its API server answers, quickly.

    dask-kubernetes gives no clear error (or hangs) without a reachable API; this looks
    where it does (kubeconfig: ``KUBECONFIG`` or ``~/.kube/config``, then the in-cluster
    service account) and asks the server its version and whether it serves the operator's
    resources, each request bounded by ``timeout``.

    Parameters
    ----------
    environ
        The environment (default ``os.environ``): ``KUBECONFIG``, ``HOME``,
        ``KUBERNETES_SERVICE_HOST``.
    timeout
        Seconds to wait for each answer.

    Returns
    -------
    KubeApi
        The server (credentials stripped), the context's namespace and the source.

    Raises
    ------
    ClusterError
        No configuration found; it does not load; the server does not answer, refuses the
        credentials, or serves no ``kubernetes.dask.org`` API (operator not installed).
        The message never holds a token, a password or a key.
    """
    from kubernetes.client import ApiClient, ApisApi, Configuration, VersionApi

    environ = os.environ if environ is None else environ
    conf = Configuration()
    namespace, source = _load_kube_config(conf, environ)
    server = _redact(conf.host)
    conf.retries = 0  # one try: an answer, a refusal or the timeout
    secrets = [str(v) for v in (conf.api_key or {}).values() if v]
    secrets += [s.split(" ", 1)[-1] for s in secrets]
    where = f"the Kubernetes API at {server} ({source})"
    fix = (
        "check the kube context (kubectl config current-context), the VPN or network, and "
        "that the dask-kubernetes operator is installed there (deploy/README.md)"
    )
    with ApiClient(conf) as api:
        try:
            VersionApi(api).get_code(_request_timeout=timeout)
            groups = ApisApi(api).get_api_versions(_request_timeout=timeout).groups or []
        except Exception as e:  # urllib3 errors, ApiException, SSL errors
            status = getattr(e, "status", None)
            if status in (401, 403):
                raise ClusterError(
                    f"{where} refused the credentials (HTTP {status}): {fix}"
                ) from None
            what = f"HTTP {status}" if status else f"{type(e).__name__}: {e}"
            what = _scrub(what, secrets)
            raise ClusterError(f"cannot reach {where}: {what}; {fix}") from None
    if DASK_OPERATOR_GROUP not in {g.name for g in groups}:
        raise ClusterError(
            f"{where} answers, but does not serve the {DASK_OPERATOR_GROUP} API: the "
            "dask-kubernetes operator (its DaskCluster resource definition) is not installed "
            "in that Kubernetes cluster; install it as deploy/README.md (section 2) says"
        )
    return KubeApi(server=server, namespace=namespace, source=source)


def _load_kube_config(conf: Any, environ: Mapping[str, str]) -> tuple[str, str]:
    """Fill ``conf`` (a kubernetes.client Configuration) as kr8s would find it.

    Returns the context's namespace and a description of where the configuration came from.
    """
    from kubernetes.config import (
        ConfigException,
        list_kube_config_contexts,
        load_incluster_config,
        load_kube_config,
    )

    home = environ.get("HOME") or os.path.expanduser("~")
    paths = environ.get("KUBECONFIG") or os.path.join(home, ".kube", "config")
    found = os.pathsep.join(p for p in paths.split(os.pathsep) if p and os.path.isfile(p))
    if found:
        try:
            load_kube_config(config_file=found, client_configuration=conf, persist_config=False)
            _, context = list_kube_config_contexts(found)
            namespace = (context or {}).get("context", {}).get("namespace")
        except Exception as e:  # a broken file; its text may hold credentials: say where
            raise ClusterError(
                f"cannot use the kubeconfig {found} ({type(e).__name__}): check it with "
                "kubectl config view, or set KUBECONFIG to another file"
            ) from None
        return namespace or "default", f"kubeconfig {found}"
    if environ.get("KUBERNETES_SERVICE_HOST") and os.path.isdir(_SERVICE_ACCOUNT):
        try:
            load_incluster_config(client_configuration=conf)
        except ConfigException as e:
            raise ClusterError(f"cannot use the in-cluster service account: {e}") from None
        with suppress(OSError), open(os.path.join(_SERVICE_ACCOUNT, "namespace")) as f:
            return f.read().strip() or "default", "in-cluster service account"
        return "default", "in-cluster service account"
    raise ClusterError(
        "cluster.kind 'kubernetes': no Kubernetes configuration found (KUBECONFIG "
        f"{'is ' + repr(paths) if environ.get('KUBECONFIG') else 'unset'}, no {paths} file, "
        "not inside a pod with a service account): run inside the cluster or set KUBECONFIG "
        "to a kubeconfig file (kubectl config view --minify --raw > FILE)"
    )


def _kube_cluster_class() -> type:
    """dask-kubernetes' operator KubeCluster, with a bounded start (imported on demand)."""
    from dask_kubernetes.operator import KubeCluster

    class BoundedKubeCluster(KubeCluster):
        """A KubeCluster whose start gives up after ``start_timeout`` seconds.

        dask-kubernetes waits without end for a scheduler Pod that stays Pending (no node
        fits it, the image does not pull) and for its Service; this bounds the whole start,
        then deletes the DaskCluster it created (never one it found) and raises
        :class:`ClusterError` saying how far the start got.
        """

        def __init__(self, *, start_timeout: float, **kw: Any) -> None:
            self._start_timeout = start_timeout
            self._created = False
            try:
                super().__init__(**kw)
            except BaseException:
                with suppress(AttributeError):  # stop the loop thread this start began
                    self._loop_runner.stop()
                raise

        async def _create_cluster(self) -> None:
            self._created = True
            await super()._create_cluster()

        async def _start(self) -> None:
            bound = asyncio.timeout(self._start_timeout)
            try:
                async with bound:
                    await super()._start()
            except BaseException:
                if self._created:  # half-started: of no use to anyone
                    await self._delete_quietly()
                if not bound.expired():
                    raise
                seen = getattr(self, "_startup_component_status", {}) or {}
                got = ", ".join(f"{k} {v}" for k, v in seen.items()) or "nothing yet"
                raise ClusterError(
                    f"Kubernetes cluster {self.name} in namespace {self.namespace} did not "
                    f"start within {self._start_timeout:.0f} s (seen: {got}); it was "
                    f"deleted. Check kubectl -n {self.namespace} get pods -l "
                    f"dask.org/cluster-name={self.name} and kubectl describe them (image "
                    "pull, requests larger than any node, quotas), that the dask-kubernetes "
                    "operator runs, or raise cluster.timeout"
                ) from None

        async def _delete_quietly(self) -> None:
            self.shutdown_on_close = True
            try:
                await asyncio.wait_for(self._close(timeout=30), 40)
            except Exception as e:  # never hide the start's own error behind this one
                log.warning("kubernetes: deleting cluster %s: %s", self.name, type(e).__name__)

    return BoundedKubeCluster


def _kubernetes(cfg: ClusterConfig, timeout: float) -> Iterator[Client]:
    try:
        import dask_kubernetes.operator  # noqa: F401
    except ImportError:
        raise ClusterError(
            "cluster.kind 'kubernetes' needs dask-kubernetes: pip install dask-kubernetes"
        ) from None
    from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode

    t0 = time.monotonic()
    api = kubernetes_api()
    name = kubernetes_cluster_name(cfg.name_prefix)
    namespace = cfg.namespace or api.namespace
    adaptive = dict(cfg.adaptive or {})
    wanted = adaptive.get("minimum", 0) if adaptive else (cfg.workers or 1)
    kw: dict[str, Any] = {"n_workers": wanted, "namespace": namespace}
    if cfg.image:
        kw["image"] = cfg.image
    if cfg.resources:
        kw["resources"] = cfg.resources
    log.info("kubernetes: starting cluster %s in namespace %s at %s", name, namespace, api.server)
    try:
        cluster = _kube_cluster_class()(
            name=name,
            create_mode=CreateMode.CREATE_ONLY,  # never join (then delete) another's cluster
            shutdown_on_close=cfg.shutdown_on_exit,
            resource_timeout=min(60, timeout),  # its own "is the operator running?" check
            start_timeout=timeout,
            quiet=True,  # popdask logs; only the CLI prints
            **kw,
        )
    except ClusterError:
        raise
    except Exception as e:
        raise ClusterError(
            f"Kubernetes cluster {name} in namespace {namespace} at {api.server} failed to "
            f"start: {type(e).__name__}: {e}"
        ) from None
    log.info("kubernetes: cluster %s running after %.2f s", name, time.monotonic() - t0)
    started = False
    try:
        if adaptive:
            cluster.adapt(**adaptive)
        with Client(cluster) as client:
            if wanted > 0:
                try:
                    left = max(1.0, t0 + timeout - time.monotonic())
                    client.wait_for_workers(1, timeout=left)
                except TimeoutError:
                    raise ClusterError(
                        f"no dask worker joined Kubernetes cluster {name} in namespace "
                        f"{namespace} within {timeout:.0f} s: check kubectl -n {namespace} "
                        f"get pods -l dask.org/cluster-name={name},dask.org/component=worker "
                        "(pending: image, resources, quotas), or raise cluster.timeout"
                    ) from None
            started = True
            _announce(client, f"kubernetes cluster {name} (namespace {namespace})")
            yield client
    finally:
        if not started:
            cluster.shutdown_on_close = True  # half-started: of no use to anyone
        try:
            cluster.close()
        except Exception as e:  # never hide the run's own error behind this one
            log.warning("kubernetes: closing cluster %s: %s", name, type(e).__name__)
        if cluster.shutdown_on_close:
            log.info("kubernetes: cluster %s deleted", name)
        else:
            log.info(
                "kubernetes: leaving cluster %s running in namespace %s; reconnect with "
                "KubeCluster.from_name(%r, namespace=%r), delete it with kubectl -n %s "
                "delete daskcluster %s",
                name,
                namespace,
                name,
                namespace,
                namespace,
                name,
            )


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
