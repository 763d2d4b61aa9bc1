"""``cluster.kind: kubernetes`` without a Kubernetes cluster: names, and the errors a user
gets fast when the Kubernetes API is not there, not configured, or lacks the operator.

No real Kubernetes API exists on the test machine: starting pods is not tested. What is
tested runs the real code against real (loopback) sockets; nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from dask_kubernetes.constants import VALID_CLUSTER_NAME

from popdask.cluster import ClusterError, get_client, kubernetes_cluster_name
from popdask.config import ClusterConfig
from popdask.stac_server import free_port

TOKEN = "kube-token-4f1c9e77d2a0b3"  # what a kubeconfig holds; must never be shown
CFG = ClusterConfig(kind="kubernetes", workers=1, timeout=120)

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{server}"}}
contexts:
- name: test
  context: {{cluster: test, user: alice, namespace: popdask-test}}
current-context: test
users:
- name: alice
  user: {{token: {token}}}
"""


@pytest.fixture
def kube_env(tmp_path, monkeypatch):
    """An empty HOME, no KUBECONFIG, not in a pod; returns a function that writes a
    kubeconfig for a server URL and points KUBECONFIG at it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)

    def write(server: str) -> None:
        path = tmp_path / "kubeconfig"
        path.write_text(KUBECONFIG.format(server=server, token=TOKEN))
        monkeypatch.setenv("KUBECONFIG", str(path))

    return write


def _start_error(caplog) -> tuple[str, float]:
    """The ClusterError ``get_client(CFG)`` raises, and the seconds it took."""
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err, get_client(CFG):
        pass
    took = time.monotonic() - t0
    assert TOKEN not in str(err.value) and TOKEN not in caplog.text
    return str(err.value), took


def test_each_run_gets_its_own_valid_cluster_name():
    a, b = kubernetes_cluster_name(), kubernetes_cluster_name()
    assert a != b
    for name in (a, b, kubernetes_cluster_name("eu-rebuild")):
        assert VALID_CLUSTER_NAME.match(name), name  # dask-kubernetes' own rule (≤ 53)
    assert a.startswith("popdask-") and kubernetes_cluster_name("eu").startswith("eu-")
    with pytest.raises(ValueError, match="name_prefix"):
        kubernetes_cluster_name("EU_run")


def test_without_kube_configuration_the_error_says_how_to_fix_it(kube_env, caplog):
    message, took = _start_error(caplog)
    assert "no Kubernetes configuration found" in message
    assert "run inside the cluster or set KUBECONFIG" in message
    assert took < 5


def test_an_unreachable_api_fails_fast_naming_the_server(kube_env, caplog):
    port = free_port()  # nothing listens there
    kube_env(f"https://127.0.0.1:{port}")
    message, took = _start_error(caplog)
    assert f"cannot reach the Kubernetes API at https://127.0.0.1:{port}" in message
    assert "VPN" in message and "deploy/README.md" in message
    assert took < 10 < CFG.timeout


#: What a Kubernetes 1.31 API server answers to GET /version.
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0",
    "gitCommit": "9edcffcde5595e8a5b1a35f88c421764e575afce",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T07:28:49Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class _ApiWithoutOperator(BaseHTTPRequestHandler):
    """Answers as a Kubernetes API server would that has no dask-kubernetes operator: its
    version, an API group list without kubernetes.dask.org, 404 for anything else."""

    groups: ClassVar[list[dict]] = []
    seen_tokens: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen_tokens.append(self.headers.get("Authorization", ""))
        path = self.path.split("?")[0].rstrip("/")  # the kubernetes client asks /version/
        if path == "/version":
            self._send(200, VERSION)
        elif path == "/apis":
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": self.groups})
        else:
            self._get(path)

    def _get(self, path: str) -> None:
        self._send(404, {"kind": "Status", "apiVersion": "v1", "code": 404, "message": path})

    def do_POST(self) -> None:  # creating a DaskCluster: no such resource
        self._get(self.path)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


_V1 = {"groupVersion": "kubernetes.dask.org/v1", "version": "v1"}


class _OperatorWithoutPods(_ApiWithoutOperator):
    """An API with the operator's resources, whose operator marks each DaskCluster created
    Running at once but whose scheduler Pod never runs (as when it stays Pending: no node
    fits it, its image does not pull). Keeps the DaskClusters, and which were deleted."""

    groups: ClassVar[list[dict]] = [
        {"name": "kubernetes.dask.org", "versions": [_V1], "preferredVersion": _V1}
    ]
    clusters: ClassVar[dict[str, dict]] = {}
    deleted: ClassVar[list[str]] = []

    def _get(self, path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        if path.endswith("/daskclusters"):
            items = list(self.clusters.values())
            self._send(200, {"kind": "DaskClusterList", **_V1, "metadata": {}, "items": items})
        elif "/daskclusters/" in path and name in self.clusters:
            self._send(200, self.clusters[name])
        elif path.endswith("/pods"):  # no scheduler pod, ever
            self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []})
        else:
            super()._get(path)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["status"] = {"phase": "Running"}
        self.clusters[body["metadata"]["name"]] = body
        self._send(201, body)

    def do_DELETE(self) -> None:
        name = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        self.deleted.append(name)
        self.clusters.pop(name, None)
        self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_api_without_the_operator_is_named(kube_env, caplog):
    with _serve(_ApiWithoutOperator) as url:
        kube_env(url)
        message, took = _start_error(caplog)
    assert f"the Kubernetes API at {url}" in message
    assert "dask-kubernetes operator" in message and "not installed" in message
    assert took < 10
    assert f"Bearer {TOKEN}" in _ApiWithoutOperator.seen_tokens  # the kubeconfig was used


@pytest.mark.timeout(60)  # dask-kubernetes alone waits for the scheduler pod for ever
def test_a_cluster_that_does_not_start_in_time_is_deleted(kube_env, caplog):
    cfg = ClusterConfig(kind="kubernetes", workers=1, timeout=3, shutdown_on_exit=False)
    with _serve(_OperatorWithoutPods) as url:
        kube_env(url)
        caplog.set_level(logging.INFO, logger="popdask")
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as err, get_client(cfg):
            pass
        took = time.monotonic() - t0
    (name,) = _OperatorWithoutPods.deleted  # deleted although shutdown_on_exit is false
    assert not _OperatorWithoutPods.clusters
    message = str(err.value)
    assert (
        f"Kubernetes cluster {name} in namespace popdask-test did not start within 3 s" in message
    )
    assert f"-l dask.org/cluster-name={name}" in message and "raise cluster.timeout" in message
    assert 3 <= took < 8
    assert name in caplog.text and TOKEN not in message + caplog.text
