"""A real, in-memory STAC API on loopback, for the demo and the tests.

:class:`StacServer` starts ``rustac serve`` (the CLI shipped by the ``rustac`` package) on a
free local port with a set of Collection JSON and item ndjson files, waits until the API
answers, and stops it again. It is a context manager::

    with StacServer([coll_json], [items_ndjson]) as server:
        client = pystac_client.Client.open(server.url)

Notes
-----
Measured with rustac 0.9.18 (see ``PITFALLS.md``):

* ``--addr 127.0.0.1:0`` binds an ephemeral port but advertises ``:0`` in every link, which
  breaks paging, so a free port is picked first (:func:`free_port`).
* The memory backend implements ``bbox``, ``datetime``, ``intersects``, ``ids`` and paging, but
  not the query/filter/sortby extensions (a ``query`` silently returns zero items).
* Relative links resolve against the process working directory, hence ``cwd``.
* It is one process; SIGTERM stops it at once.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import requests

__all__ = ["StacServer", "find_rustac", "free_port", "wait_for_http"]

#: Servers started and not yet stopped (strong references: a running server is a live
#: resource even when its object is dropped); stopped at interpreter exit as a last resort.
_LIVE: set[StacServer] = set()


def _stop_live_servers() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_stop_live_servers)


def stop_process(
    proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 5.0
) -> None:
    """Stop ``proc``: ``sig``, then SIGKILL if it has not exited after ``timeout`` s; reap it."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    else:
        proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    Binds a socket to port 0, reads the port the OS chose and closes the socket. Another
    process may take the port before it is used; :meth:`StacServer.start` retries then.

    Parameters
    ----------
    host : str
        Interface to bind to.

    Returns
    -------
    int
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_rustac() -> Path:
    """Locate the ``rustac`` executable.

    Looks next to the running interpreter first (the virtual environment's ``bin``), then on
    ``PATH``.

    Returns
    -------
    pathlib.Path
        Path of the executable.

    Raises
    ------
    FileNotFoundError
        If no ``rustac`` executable is found.
    """
    bindir = Path(sys.executable).parent  # not resolved: keep the venv's bin, not the base's
    found = shutil.which("rustac", path=str(bindir)) or shutil.which("rustac")
    if found is None:
        raise FileNotFoundError(
            f"the 'rustac' command was not found next to {sys.executable} nor on PATH; "
            "install it with `pip install rustac` (it ships the `rustac serve` STAC API)"
        )
    return Path(found)


def wait_for_http(
    url: str,
    timeout: float = 30.0,
    *,
    interval: float = 0.1,
    alive: subprocess.Popen | None = None,
) -> requests.Response:
    """Poll ``GET url`` until it answers HTTP 200.

    Parameters
    ----------
    url : str
        URL to poll.
    timeout : float
        Seconds to wait in total.
    interval : float
        Seconds between attempts.
    alive : subprocess.Popen, optional
        A process that must keep running while waiting: if it exits, stop waiting at once.

    Returns
    -------
    requests.Response
        The first 200 response.

    Raises
    ------
    ChildProcessError
        If ``alive`` exited before the URL answered.
    TimeoutError
        If the URL did not answer 200 within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if alive is not None and alive.poll() is not None:
            raise ChildProcessError(f"process exited with code {alive.returncode}")
        try:
            response = requests.get(url, timeout=max(0.5, min(5.0, interval * 20)))
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s (last: {last})")
        time.sleep(interval)


def _collection_ids(paths: Sequence[Path]) -> list[str]:
    """Ids of the Collection JSON files (those that parse as a Collection)."""
    ids = []
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # rustac itself reports unreadable files
        if isinstance(doc, dict) and doc.get("type") == "Collection" and "id" in doc:
            ids.append(str(doc["id"]))
    return ids


class StacServer:
    """An in-memory STAC API (``rustac serve``) on loopback.

    Parameters
    ----------
    collections : list of pathlib.Path
        STAC Collection JSON files.
    items : list of pathlib.Path
        Item files: newline-delimited JSON (one Item per line) or FeatureCollection JSON. Each
        item's ``collection`` must be one of ``collections``.
    host : str
        Interface to serve on; loopback by default.
    port : int, optional
        Port to serve on; by default a free port is chosen (and re-chosen if taken meanwhile).
    startup_timeout : float
        Seconds to wait for the API to answer ``GET /`` with 200.
    cwd : pathlib.Path, optional
        Working directory of the server process; relative links in the inputs resolve
        against it. Defaults to the directory of the first input file.
    log_path : pathlib.Path, optional
        File receiving the server's stdout and stderr (kept). By default a temporary file,
        deleted by :meth:`stop`.
    extra_args : sequence of str
        Further ``rustac serve`` options, e.g. ``["--create-collections"]``.

    Attributes
    ----------
    url : str
        Root URL of the API without trailing slash, e.g. ``"http://127.0.0.1:53123"``; set by
        :meth:`start` (and left as it was after :meth:`stop`).
    bound_port : int or None
        The port actually served on, once started.
    process : subprocess.Popen or None
        The server process while running.
    """

    #: Attempts when a chosen free port is taken before the server binds it.
    port_attempts = 3
    #: Seconds to wait after SIGTERM before SIGKILL.
    stop_timeout = 5.0

    def __init__(
        self,
        collections: Sequence[Path | str],
        items: Sequence[Path | str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 30.0,
        cwd: Path | str | None = None,
        log_path: Path | str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.collections = [Path(p).absolute() for p in collections]
        self.items = [Path(p).absolute() for p in items]
        if not self.collections and not self.items:
            raise ValueError("StacServer needs at least one collection or item file")
        self.host = host
        self.port = port
        self.startup_timeout = float(startup_timeout)
        first = (self.collections or self.items)[0]
        self.cwd = Path(cwd).absolute() if cwd is not None else first.parent
        self._keep_log = log_path is not None
        self.log_path: Path | None = Path(log_path).absolute() if log_path is not None else None
        self.extra_args = list(extra_args)
        self.url = ""
        self.bound_port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public API
    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> StacServer:
        """Start the server and wait until it answers.

        Returns
        -------
        StacServer
            ``self``, with :attr:`url` set.

        Raises
        ------
        FileNotFoundError
            If an input file or the ``rustac`` executable is missing.
        RuntimeError
            If the server exits during start-up (e.g. an invalid input file; the message ends
            with its log), does not answer within ``startup_timeout``, or does not list a
            given collection. No process is left running.
        """
        with self._lock:
            if self.running:
                return self
            missing = [str(p) for p in (*self.collections, *self.items) if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"STAC input file(s) not found: {', '.join(missing)}")
            if not self.cwd.is_dir():
                raise FileNotFoundError(f"working directory not found: {self.cwd}")
            exe = find_rustac()
            attempts = 1 if self.port is not None else self.port_attempts
            for attempt in range(1, attempts + 1):
                port = self.port if self.port is not None else free_port(self.host)
                try:
                    self._launch(exe, port)
                    self._check_collections()
                    return self
                except _PortTaken:
                    self._cleanup()
                    if attempt == attempts:
                        raise RuntimeError(
                            f"rustac serve could not bind {self.host}:{port}: address in use"
                        ) from None
                except BaseException:
                    self._cleanup()
                    self.url, self.bound_port = "", None
                    raise
            raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after :attr:`stop_timeout` s).

        Safe to call more than once and on a server that never started.
        """
        with self._lock:
            self._cleanup()

    def log_tail(self, n_chars: int = 2000) -> str:
        """Return the last ``n_chars`` characters of the server's output."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text[-n_chars:].strip()

    def __enter__(self) -> StacServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"StacServer({self.url or 'not started'}, {state})"

    # ------------------------------------------------------------------ internals
    def _open_log(self) -> None:
        if self._keep_log:
            assert self.log_path is not None
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w+b")  # closed in _cleanup
        else:
            fd, name = tempfile.mkstemp(prefix="popdask-rustac-", suffix=".log")
            self._log = os.fdopen(fd, "w+b")
            self.log_path = Path(name)

    def _launch(self, exe: Path, port: int) -> None:
        self._open_log()
        url = f"http://{self.host}:{port}"
        cmd = [
            str(exe),
            "serve",
            "--addr",
            f"{self.host}:{port}",
            *self.extra_args,
            *map(str, self.collections),
            *map(str, self.items),
        ]
        # A file (not a pipe) for the output: it can never fill up and block the server.
        self.process = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        _LIVE.add(self)
        try:
            wait_for_http(f"{url}/", self.startup_timeout, alive=self.process)
        except ChildProcessError:
            tail = self.log_tail()
            if "address in use" in tail.lower() or "addrinuse" in tail.lower():
                raise _PortTaken() from None
            raise RuntimeError(
                f"rustac serve exited with code {self.process.returncode} during start-up "
                f"(cmd: {' '.join(cmd)}; cwd: {self.cwd}). Its output:\n{tail}"
            ) from None
        except TimeoutError as exc:
            raise RuntimeError(
                f"rustac serve did not come up: {exc}. Output:\n{self.log_tail()}"
            ) from exc
        self.url = url
        self.bound_port = port

    def _check_collections(self) -> None:
        wanted = _collection_ids(self.collections)
        if not wanted:
            return
        response = requests.get(f"{self.url}/collections", timeout=10)
        response.raise_for_status()
        served = {c.get("id") for c in response.json().get("collections", [])}
        lost = [c for c in wanted if c not in served]
        if lost:
            raise RuntimeError(
                f"rustac serve started but does not list collection(s) {lost}; "
                f"it lists {sorted(map(str, served))}. Output:\n{self.log_tail()}"
            )

    def _cleanup(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, timeout=self.stop_timeout)
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
            if not self._keep_log and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
                self.log_path = None


class _PortTaken(Exception):
    """The chosen port was taken between :func:`free_port` and the server binding it."""
