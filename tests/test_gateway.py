"""``cluster: {kind: gateway}`` against a real Dask Gateway server on loopback.

A module-scoped fixture starts ``dask-gateway-server`` (UnsafeLocalBackend: schedulers and
workers are local processes; SimpleAuthenticator: one shared password) on free 127.0.0.1
ports, and stops it afterwards, checking that no process it started is left behind.
Credentials reach popdask only through the environment, never through the YAML.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import xarray as xr
from conftest import write_config

from popdask import cli
from popdask.cluster import ClusterError, close_gateway, get_client
from popdask.config import ClusterConfig

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
USERNAME = "alice"
PASSWORD = "pw-" + secrets.token_hex(12)  # unique, so a leak is found by a plain search

SERVER_CONFIG = """\
from dask_gateway_server.options import Float, Integer, Options

c.DaskGateway.address = "127.0.0.1:{api}"          # private API, behind the proxy
c.Proxy.address = "127.0.0.1:{http}"               # clients' HTTP API and dashboards
c.Proxy.tcp_address = "127.0.0.1:{tcp}"            # schedulers, TLS
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.LocalBackend.clusters_directory = {clusters!r}
c.ClusterConfig.scheduler_cmd = [{dask!r}, "scheduler"]  # distributed 2026.8 ships no
c.ClusterConfig.worker_cmd = [{dask!r}, "worker"]        # dask-scheduler / dask-worker
c.ClusterConfig.worker_cores = 1
c.ClusterConfig.worker_memory = "2 G"
c.ClusterConfig.cluster_max_workers = 2
c.ClusterConfig.idle_timeout = 120                  # reaps clusters a failed test leaves


def _options(options):
    return {{"worker_cores": options.worker_cores,
             "worker_memory": int(options.worker_memory * 2**30)}}


c.Backend.cluster_options = Options(
    Integer("worker_cores", default=1, min=1, max=1),
    Float("worker_memory", default=2, min=1, max=2, label="GiB"),
    handler=_options,
)
"""


# --------------------------------------------------------------------------------------
# The gateway server
# --------------------------------------------------------------------------------------
@dataclass
class GatewayServer:
    address: str  # http://127.0.0.1:PORT, what clients talk to
    proxy_address: str  # gateway://127.0.0.1:PORT, the schedulers' TLS proxy
    clusters_dir: Path
    log_path: Path
    pid: int

    def gateway(self, password: str = PASSWORD):
        """A dask_gateway.Gateway for checks (the caller closes it)."""
        from dask_gateway import BasicAuth, Gateway

        return Gateway(self.address, self.proxy_address, auth=BasicAuth(USERNAME, password))

    def cluster_yaml(self, **extra) -> str:
        items = {
            "kind": "gateway",
            "address": self.address,
            "proxy_address": self.proxy_address,
            "auth": "basic",
            **extra,
        }
        return "{" + ", ".join(f"{k}: {v}" for k, v in items.items()) + "}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ours(root: Path, server_pid: int | None = None) -> list[psutil.Process]:
    """Processes the server started: its descendants, and anything working under ``root``."""
    found: dict[int, psutil.Process] = {}
    if server_pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in psutil.Process(server_pid).children(recursive=True):
                found[p.pid] = p
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.cwd().startswith(str(root)) and p.status() != psutil.STATUS_ZOMBIE:
                found[p.pid] = p
    return list(found.values())


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@pytest.fixture(scope="module")
def gateway_server(tmp_path_factory):
    """A real dask-gateway-server on loopback; stopped (and checked for orphans) after."""
    root = tmp_path_factory.mktemp("gateway")
    clusters = root / "clusters"
    clusters.mkdir()
    api, http, tcp = _free_ports(3)
    config = root / "dask_gateway_config.py"
    config.write_text(
        SERVER_CONFIG.format(
            api=api,
            http=http,
            tcp=tcp,
            password=PASSWORD,
            clusters=str(clusters),
            dask=str(VENV_BIN / "dask"),
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_GATEWAY__")}
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(VENV_BIN / "dask-gateway-server"), "-f", str(config)],
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = GatewayServer(
        f"http://127.0.0.1:{http}", f"gateway://127.0.0.1:{tcp}", clusters, log_path, proc.pid
    )
    spawned: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dask-gateway-server exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.address}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dask-gateway-server silent:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        spawned = {p.pid: p for p in _ours(root, proc.pid)}
        proc.send_signal(signal.SIGTERM)  # stops its clusters, then its proxy, then itself
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive([*spawned.values(), *_ours(root, proc.pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive([*spawned.values(), *_ours(root, proc.pid)])
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, f"processes outlived dask-gateway-server: {left}"
    assert PASSWORD not in log_path.read_text()


@pytest.fixture
def credentials(monkeypatch):
    """The gateway's credentials, the way dask-gateway reads them: environment only."""
    monkeypatch.setenv("DASK_GATEWAY__AUTH__KWARGS__USERNAME", USERNAME)
    monkeypatch.setenv("DASK_GATEWAY__AUTH__KWARGS__PASSWORD", PASSWORD)


# --------------------------------------------------------------------------------------
# Running the pipeline through the gateway, and locally
# --------------------------------------------------------------------------------------
@dataclass
class Run:
    yaml: Path
    store: Path
    rc: int
    seconds: float
    out: str  # stdout + stderr
    logs: str  # every log record, DEBUG and up
    records: list[logging.LogRecord]


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _run_cli(d: Path, cluster: str, url: str, census: Path) -> Run:
    """``popdask run`` on the test configuration; capture output and every log record."""
    yaml = write_config(d, url=url, census=census, cluster=cluster)
    keep, root = _Keep(), logging.getLogger()
    level = root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            t0 = time.perf_counter()
            rc = cli.main(["run", str(yaml)])
            seconds = time.perf_counter() - t0
    finally:
        root.removeHandler(keep)
        root.setLevel(level)
    text = []
    for r in keep.records:
        try:
            text.append(r.getMessage())
        except Exception:  # a third-party record with bad args: keep its raw parts
            text.append(f"{r.msg} {r.args}")
    return Run(yaml, d / "out.zarr", rc, seconds, buf.getvalue(), "\n".join(text), keep.records)


def _logged_seconds(run: Run, template: str) -> float:
    for r in run.records:
        if r.name == "popdask.cluster" and r.msg == template:
            return float(r.args[-1])
    raise AssertionError(f"no log record {template!r}")


@pytest.fixture(scope="module")
def gateway_run(tmp_path_factory, gateway_server, demo_region, stac_api):
    """The test configuration run through the gateway (2 workers); credentials from env."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DASK_GATEWAY__AUTH__KWARGS__USERNAME", USERNAME)
        mp.setenv("DASK_GATEWAY__AUTH__KWARGS__PASSWORD", PASSWORD)
        run = _run_cli(
            tmp_path_factory.mktemp("gateway_run"),
            gateway_server.cluster_yaml(workers=2, shutdown_on_exit="true"),
            stac_api,
            demo_region.census,
        )
    assert run.rc == 0, run.out
    return run


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, dask_cluster, demo_region, stac_api):
    """The same configuration on the session's LocalCluster (``kind: address``)."""
    run = _run_cli(
        tmp_path_factory.mktemp("local_run"),
        f'{{kind: address, address: "{dask_cluster}"}}',
        stac_api,
        demo_region.census,
    )
    assert run.rc == 0, run.out
    return run


def test_gateway_run_equals_local_run(gateway_run, local_run, request):
    g = xr.open_zarr(gateway_run.store)
    loc = xr.open_zarr(local_run.store)
    assert g.sizes == loc.sizes
    np.testing.assert_array_equal(g.cluster.values, loc.cluster.values)
    np.testing.assert_allclose(g.population.values, loc.population.values, rtol=1e-5, atol=1e-5)
    started = _logged_seconds(gateway_run, "dask-gateway: cluster %s running after %.2f s")
    first = _logged_seconds(gateway_run, "dask-gateway: first worker after %.2f s")
    figures = {
        "gateway_cluster_running_s": round(started, 2),
        "gateway_first_worker_s": round(first, 2),
        "gateway_run_total_s": round(gateway_run.seconds, 2),
        "local_run_total_s": round(local_run.seconds, 2),
    }
    request.node.user_properties.extend(figures.items())  # in reports, with or without -s
    print("gateway timings:", figures)


def test_gateway_run_logs_dashboard_and_never_the_password(gateway_run, gateway_server):
    assert f"dashboard {gateway_server.address}/clusters/" in gateway_run.logs
    assert "dask-gateway: asked for 2 workers" in gateway_run.logs
    assert PASSWORD not in gateway_run.logs
    assert PASSWORD not in gateway_run.out
    assert PASSWORD not in gateway_run.yaml.read_text()
    secret = PASSWORD.encode()
    for f in gateway_run.yaml.parent.rglob("*"):
        if f.is_file():
            assert secret not in f.read_bytes(), f


def test_no_cluster_left_after_the_run(gateway_run, gateway_server):
    assert "dask-gateway: cluster %s shut down" in [r.msg for r in gateway_run.records]
    gw = gateway_server.gateway()
    try:
        assert gw.list_clusters() == []
    finally:
        close_gateway(gw)
    # and no scheduler or worker process is left under the server's cluster folder
    deadline = time.monotonic() + 20
    while _alive(_ours(gateway_server.clusters_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(_ours(gateway_server.clusters_dir))


# --------------------------------------------------------------------------------------
# get_client directly: timings, options, kept clusters, errors
# --------------------------------------------------------------------------------------
def test_get_client_options_timings_and_keep(gateway_server, credentials, request, caplog):
    """Options reach the gateway; ``shutdown_on_exit: false`` keeps the cluster, by name."""
    caplog.set_level(logging.INFO, logger="popdask.cluster")
    cfg = ClusterConfig(
        kind="gateway",
        address=gateway_server.address,
        proxy_address=gateway_server.proxy_address,
        auth="basic",
        workers=2,
        options={"worker_cores": 1, "worker_memory": 1.5},
        shutdown_on_exit=False,
    )
    t0 = time.perf_counter()
    with get_client(cfg) as client:
        t_first = time.perf_counter() - t0
        client.wait_for_workers(2, timeout=60)
        t_all = time.perf_counter() - t0
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["memory_limit"] for w in workers] == [int(1.5 * 2**30)] * 2
        assert [w["nthreads"] for w in workers] == [1, 1]
        assert client.submit(sum, [1, 2, 3]).result() == 6
    request.node.user_properties.append(("get_client_first_worker_s", round(t_first, 2)))
    request.node.user_properties.append(("get_client_two_workers_s", round(t_all, 2)))
    print(f"get_client: first worker {t_first:.2f} s, two workers {t_all:.2f} s")
    kept = [r for r in caplog.records if r.msg.startswith("dask-gateway: leaving cluster")]
    assert len(kept) == 1
    name = kept[0].args[0]
    gw = gateway_server.gateway()
    try:
        assert [c.name for c in gw.list_clusters()] == [name]
        cluster = gw.connect(name)
        cluster.shutdown()
        close_gateway(cluster.gateway)
        assert gw.list_clusters() == []
    finally:
        close_gateway(gw)
    assert PASSWORD not in caplog.text


def test_wrong_password_is_a_clear_error(tmp_path, gateway_server, demo_region, monkeypatch):
    wrong = "wrong-" + secrets.token_hex(12)
    monkeypatch.setenv("DASK_GATEWAY__AUTH__KWARGS__USERNAME", USERNAME)
    monkeypatch.setenv("DASK_GATEWAY__AUTH__KWARGS__PASSWORD", wrong)
    run = _run_cli(
        tmp_path, gateway_server.cluster_yaml(workers=1), "http://127.0.0.1:9", demo_region.census
    )
    assert run.rc == 1
    assert "refused the credentials (HTTP 401)" in run.out
    assert "DASK_GATEWAY__AUTH__KWARGS__" in run.out
    assert wrong not in run.out and wrong not in run.logs
    assert PASSWORD not in run.out and PASSWORD not in run.logs
    cfg = ClusterConfig(
        kind="gateway",
        address=gateway_server.address,
        proxy_address=gateway_server.proxy_address,
        auth="basic",
    )
    with pytest.raises(ClusterError) as e:
        with get_client(cfg):
            pass  # pragma: no cover
    assert wrong not in str(e.value) and e.value.__cause__ is None


def test_unknown_cluster_option_names_it(gateway_server, credentials, monkeypatch):
    # no cluster.auth: the type comes from the environment, as on a daskhub
    monkeypatch.setenv("DASK_GATEWAY__AUTH__TYPE", "basic")
    cfg = ClusterConfig(
        kind="gateway",
        address=gateway_server.address,
        proxy_address=gateway_server.proxy_address,
        workers=1,
        options={"worker_cores": 1, "gpus": 4},
    )
    with pytest.raises(ClusterError, match=r"'gpus' not offered") as e:
        with get_client(cfg):
            pass  # pragma: no cover
    assert "it offers: worker_cores, worker_memory" in str(e.value)
    gw = gateway_server.gateway()
    try:
        assert gw.list_clusters() == []  # refused before any cluster was asked for
    finally:
        close_gateway(gw)


def test_bad_option_value_is_a_clear_error(gateway_server, credentials):
    cfg = ClusterConfig(
        kind="gateway",
        address=gateway_server.address,
        proxy_address=gateway_server.proxy_address,
        auth="basic",
        options={"worker_cores": 8},
    )
    with pytest.raises(ClusterError, match=r"cluster.options.worker_cores: .*<= 1"):
        with get_client(cfg):
            pass  # pragma: no cover


def test_settings_reread_the_environment_and_keep_credentials_as_text():
    from popdask.cluster import gateway_settings

    s = gateway_settings(
        {
            "DASK_GATEWAY__ADDRESS": "http://gw:8000",
            "DASK_GATEWAY__AUTH__TYPE": "basic",
            "DASK_GATEWAY__AUTH__KWARGS__USERNAME": "007",
            "DASK_GATEWAY__AUTH__KWARGS__PASSWORD": "12345",
            "DASK_OTHER": "1",
        }
    )
    assert s["address"] == "http://gw:8000"
    assert s["auth"] == {"type": "basic", "kwargs": {"username": "007", "password": "12345"}}


def test_no_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DASK_GATEWAY__ADDRESS", raising=False)
    with pytest.raises(ClusterError, match=r"needs cluster\.address"):
        with get_client(ClusterConfig(kind="gateway", auth="basic")):
            pass  # pragma: no cover
