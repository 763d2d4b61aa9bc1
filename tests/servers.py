"""Real servers on loopback for the cloud tests: PostgreSQL+pgstac, stac-fastapi, nginx, moto.

Each server is a context manager that starts the real program on 127.0.0.1 on a free
port, waits until it answers, and stops it (and removes its temporary files) on exit::

    with PostgresServer() as pg, PgstacApi(pg, collections, items) as api, \\
            NginxServer(root) as web, MotoServer() as s3:
        ...

Nothing is mocked. The Debian programs (``postgres``/``initdb`` with PostGIS, ``nginx``)
are installed by ``.ci/services``; the Python ones (pypgstac, stac-fastapi-pgstac,
uvicorn, moto) by pip. :func:`missing_services` says what is not there.

Every process started is a direct child (``Popen``, foreground mode), registered until
stopped, and stopped at interpreter exit as a last resort, so none is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import requests

from popdask.stac_server import free_port, stop_process, wait_for_http

__all__ = [
    "PG_OS_USER",
    "MotoServer",
    "NginxServer",
    "PgstacApi",
    "PostgresServer",
    "Request",
    "missing_services",
]

#: The non-root OS user owning throwaway PostgreSQL clusters when the tests run as root
#: (``initdb`` and ``postgres`` refuse root); ``.ci/services`` creates it.
PG_OS_USER = os.environ.get("POPDASK_PG_USER", "popdask-pg")

_LIVE: set[_Server] = set()


def _stop_all() -> None:  # pragma: no cover - last resort at exit
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all)


# --------------------------------------------------------------------------------------
# Finding the programs
# --------------------------------------------------------------------------------------
def _venv_exe(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def pg_bindir() -> Path | None:
    """Folder of the PostgreSQL server programs (``postgres``, ``initdb``), newest first."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("postgres")
    return Path(exe).resolve().parent if exe else None


def _postgis_installed(bindir: Path) -> bool:
    share = bindir.parent.parent.parent.parent / "share" / "postgresql" / bindir.parent.name
    return bool(glob.glob(str(share / "extension" / "postgis.control")))


def nginx_exe() -> str | None:
    """Path of ``nginx`` (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def missing_services() -> list[str]:
    """What the cloud tests need and this machine lacks (empty when all is there)."""
    missing = []
    bindir = pg_bindir()
    if bindir is None:
        missing.append("PostgreSQL server (apt-get install postgresql; see .ci/services)")
    elif not _postgis_installed(bindir):
        missing.append(f"PostGIS for PostgreSQL {bindir.parent.name} (see .ci/services)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            missing.append(f"OS user {PG_OS_USER} (useradd; see .ci/services)")
    if nginx_exe() is None:
        missing.append("nginx (apt-get install nginx; see .ci/services)")
    for module, pip in (
        ("pypgstac", "pypgstac[psycopg]"),
        ("psycopg", "pypgstac[psycopg]"),
        ("stac_fastapi.pgstac", "stac-fastapi-pgstac"),
        ("uvicorn", "uvicorn"),
        ("moto", "moto[s3] flask flask-cors"),
        ("flask_cors", "flask-cors"),
        ("s3fs", "s3fs"),
        ("boto3", "boto3"),
    ):
        if importlib.util.find_spec(module.split(".")[0]) is None or (
            "." in module and importlib.util.find_spec(module) is None
        ):
            missing.append(f"Python package {module} (pip install {pip})")
    return missing


# --------------------------------------------------------------------------------------
# A child process with a log file
# --------------------------------------------------------------------------------------
class _Server:
    """Base: one foreground child process, its log, start/stop, context manager."""

    name = "server"
    stop_signal = signal.SIGTERM
    stop_timeout = 10.0

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._log = None

    # -- to override
    def _start(self) -> None:
        raise NotImplementedError

    def _cleanup_files(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- common
    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def _mkworkdir(self, prefix: str) -> Path:
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        return self.workdir

    def _spawn(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        assert self.workdir is not None
        if self._log is None:
            self.log_path = self.workdir / f"{self.name}.log"
            self._log = open(self.log_path, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **kwargs,
        )
        _LIVE.add(self)
        return self.process

    def log_tail(self, n: int = 3000) -> str:
        """The end of the server's output (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:].strip()

    def _serving(self, url: str, *, retry: bool) -> bool:
        """Wait until ``url`` answers. False when the process lost a port race and may be
        started again on another port (``retry``); any other failure raises."""
        try:
            wait_for_http(url, self.startup_timeout, alive=self.process)
        except ChildProcessError:
            if retry and "address already in use" in self.log_tail().lower():
                return False
            raise self._failed("exited during start-up") from None
        except TimeoutError as e:
            raise self._failed(str(e)) from None
        return True

    def _failed(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.name}: {what}. Its output:\n{self.log_tail()}")

    def start(self):
        """Start the server and wait until it answers; returns ``self``."""
        if self.running:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process (signal, then SIGKILL after :attr:`stop_timeout`), clean up."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, sig=self.stop_signal, timeout=self.stop_timeout)
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._cleanup_files()

    def __enter__(self):
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.split("/")[2]))
    return out


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------
# PostgreSQL (throwaway cluster)
# --------------------------------------------------------------------------------------
class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster: ``initdb`` in a temporary folder, ``postgres`` on a
    free loopback port, its unix socket in that folder, trust authentication, no fsync.

    As root, the cluster belongs to :data:`PG_OS_USER` (created by ``.ci/services``),
    since PostgreSQL refuses to run as root.

    Attributes
    ----------
    port : int
        TCP port on 127.0.0.1.
    database : str
        The database created for the tests.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back, disconnect, stop
    superuser = "postgres"
    initdb_args = (
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    )
    #: Server settings: small, and no durability (a throwaway test database).
    settings: ClassVar[dict[str, str]] = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "32MB",
        "max_connections": "40",
        "log_min_messages": "warning",
    }

    def __init__(self, database: str = "popdask", startup_timeout: float = 60.0) -> None:
        super().__init__()
        self.database = database
        self.port = 0
        self.startup_timeout = startup_timeout

    def dsn(self, database: str | None = None) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DB`` (trust authentication)."""
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database or self.database}"

    def _as_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam(PG_OS_USER)  # KeyError: run .ci/services
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _start(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed: run .ci/services")
        work = self._mkworkdir("popdask-pg-")
        data = work / "data"
        creds = self._as_user()
        if creds:
            os.chown(work, creds["user"], creds["group"])
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", self.superuser, *self.initdb_args],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
            **creds,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        for attempt in range(3):
            self.port = free_port()
            settings = {
                **self.settings,
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(work),
            }
            cmd = [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port)]
            for key, value in settings.items():
                cmd += ["-c", f"{key}={value}"]
            self._spawn(cmd, cwd=work, **creds)
            if self._wait_ready():
                break
            if self.process is not None and self.process.poll() is None:
                raise self._failed(f"did not accept connections in {self.startup_timeout:g} s")
            if "already in use" not in self.log_tail() or attempt == 2:
                raise self._failed("exited during start-up")
        self._psql(f'CREATE DATABASE "{self.database}"', database="postgres")

    def _wait_ready(self) -> bool:
        import psycopg

        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def _psql(self, sql: str, database: str | None = None) -> None:
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            conn.execute(sql)


# --------------------------------------------------------------------------------------
# pgstac + stac-fastapi-pgstac
# --------------------------------------------------------------------------------------
class PgstacApi(_Server):
    """pgstac in a :class:`PostgresServer` database, served by stac-fastapi-pgstac (uvicorn).

    On start: ``pypgstac migrate`` (PostGIS and the pgstac schema), then the collections
    and items are loaded (upsert), then uvicorn serves ``stac_fastapi.pgstac.app:create_app`` on a
    free loopback port with every extension enabled (query, filter, sort, fields, ...).

    Parameters
    ----------
    pg : PostgresServer
        A running PostgreSQL.
    collections, items : sequence of path
        Collection JSON files and item ndjson files.
    """

    name = "stac-fastapi-pgstac"

    def __init__(
        self,
        pg: PostgresServer,
        collections: Sequence[Path | str],
        items: Sequence[Path | str],
        *,
        startup_timeout: float = 90.0,
    ) -> None:
        super().__init__()
        self.pg = pg
        self.collections = [Path(p) for p in collections]
        self.items = [Path(p) for p in items]
        self.startup_timeout = startup_timeout
        self.url = ""
        self.pgstac_version = ""

    def load(self) -> None:
        """Migrate the database to pgstac and upsert the collections and items."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods
        from pypgstac.migrate import Migrate

        with PgstacDB(dsn=self.pg.dsn()) as db:
            self.pgstac_version = Migrate(db).run_migration()
            loader = Loader(db)
            for path in self.collections:
                loader.load_collections(str(path), insert_mode=Methods.upsert)
            for path in self.items:
                loader.load_items(str(path), insert_mode=Methods.upsert)

    def _start(self) -> None:
        if not self.pg.running:
            raise RuntimeError("PgstacApi needs a running PostgresServer")
        self.load()
        work = self._mkworkdir("popdask-stacapi-")
        env = {
            **os.environ,
            "PGUSER": self.pg.superuser,
            "PGPASSWORD": "unused-trust-auth",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.pg.port),
            "PGDATABASE": self.pg.database,
            "DB_MIN_CONN_SIZE": "1",
            "DB_MAX_CONN_SIZE": "4",
        }
        for attempt in range(3):
            port = free_port()
            app = ["stac_fastapi.pgstac.app:create_app", "--factory"]
            opts = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            quiet = ["--log-level", "warning", "--no-access-log"]
            self._spawn([sys.executable, "-m", "uvicorn", *app, *opts, *quiet], cwd=work, env=env)
            if not self._serving(f"http://127.0.0.1:{port}/", retry=attempt < 2):
                continue
            self.url = f"http://127.0.0.1:{port}"
            return


# --------------------------------------------------------------------------------------
# nginx serving a folder, with a byte-counting access log and switchable faults
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One line of :class:`NginxServer`'s access log."""

    status: int
    method: str
    path: str
    range: str  # the Range header, "-" when none
    body_bytes: int  # $body_bytes_sent


_LOG_LINE = re.compile(r'^(\d{3}) (\S+) "([^"]*)" "([^"]*)" (\d+)$')

_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    types {{ image/tiff tif tiff; application/json json; application/geo+json geojson; }}
    default_type application/octet-stream;
    log_format ranges '$status $request_method "$uri" "$http_range" $body_bytes_sent';
    access_log {work}/access.log ranges;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    sendfile on;
    keepalive_timeout 30;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
        include {work}/faults.conf;
        location / {{ }}
    }}
}}
"""


class NginxServer(_Server):
    """nginx (Debian) serving ``root`` read-only on a free loopback port.

    Range requests are nginx's own (``206 Partial Content``). The access log records per
    request the status, method, path, ``Range`` header and ``$body_bytes_sent``
    (:meth:`requests`). :meth:`fail` makes chosen paths answer an error status (an nginx
    ``location = /path { return 500; }`` rule, applied by a graceful reload) and
    :meth:`restore` removes the rules.

    Parameters
    ----------
    root : path
        Folder to serve at ``/``.
    """

    name = "nginx"
    stop_signal = signal.SIGQUIT  # graceful: finish requests in flight, then exit

    def __init__(self, root: Path | str, startup_timeout: float = 20.0) -> None:
        super().__init__()
        self.root = Path(root).resolve()
        self.startup_timeout = startup_timeout
        self.port = 0
        self.url = ""
        self._faults: dict[str, int] = {}

    def _start(self) -> None:
        exe = nginx_exe()
        if exe is None:
            raise FileNotFoundError("nginx is not installed: run .ci/services")
        work = self._mkworkdir("popdask-nginx-")
        (work / "tmp").mkdir()
        self._write_faults()
        for attempt in range(3):
            self.port = free_port()
            # as root the worker would switch to nobody and could not read the tests'
            # 0700 temporary folders: keep it root (loopback only, read-only, test files)
            conf = _NGINX_CONF.format(
                work=work,
                port=self.port,
                root=self.root,
                user="user root;" if os.geteuid() == 0 else "",
            )
            conf_path, err_path = work / "nginx.conf", work / "error.log"
            conf_path.write_text(conf)
            self._spawn([exe, "-p", str(work), "-c", str(conf_path), "-e", str(err_path)], cwd=work)
            assert self.process is not None
            if _wait_port("127.0.0.1", self.port, self.process, self.startup_timeout):
                self.url = f"http://127.0.0.1:{self.port}"
                return
            err = err_path.read_text(errors="replace") if err_path.exists() else ""
            if "Address already in use" in err and attempt < 2:
                self.stop_process_only()
                continue
            raise self._failed(f"did not come up: {err[-2000:]}")

    def stop_process_only(self) -> None:
        """Stop nginx but keep its folder (used when retrying another port)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=self.stop_timeout)

    # -- access log
    @property
    def access_log(self) -> Path:
        """The access log (``status method "uri" "range" body_bytes_sent`` per line)."""
        assert self.workdir is not None, "not started"
        return self.workdir / "access.log"

    def log_offset(self) -> int:
        """Current size of the access log: pass it to :meth:`requests` to see what follows."""
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests(self, since: int = 0) -> list[Request]:
        """Requests logged after byte offset ``since`` of the access log."""
        if not self.access_log.exists():
            return []
        with open(self.access_log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            m = _LOG_LINE.match(line.strip())
            if m:
                out.append(Request(int(m[1]), m[2], m[3], m[4], int(m[5])))
        return out

    # -- faults
    def fail(self, path: str, status: int = 500) -> None:
        """Make ``GET path`` (URL path, e.g. ``/a/b.tif``) answer ``status`` from now on."""
        self._faults[path] = status
        self._reload(path, status)

    def restore(self) -> None:
        """Remove every fault rule: all files are served again."""
        if self._faults:
            probe = next(iter(self._faults))
            self._faults.clear()
            self._reload(probe, None)

    def _write_faults(self) -> None:
        assert self.workdir is not None
        rules = "".join(f'location = "{p}" {{ return {s}; }}\n' for p, s in self._faults.items())
        (self.workdir / "faults.conf").write_text(rules)

    def _reload(self, probe: str, status: int | None) -> None:
        """Rewrite the rules, SIGHUP the master, wait until the workers of the old
        configuration have exited (they may still accept a connection or two while
        closing) and ``probe`` answers as expected."""
        assert self.process is not None and self.workdir is not None
        self._write_faults()
        old = _children(self.process.pid)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = _children(self.process.pid)
            if now and not (now & old):
                break
            time.sleep(0.02)
        while time.monotonic() < deadline:
            try:
                code = requests.head(self.url + probe, timeout=2).status_code
            except requests.RequestException:
                code = -1
            if (status is None and code in (200, 404)) or code == status:
                return
            time.sleep(0.05)
        raise self._failed(f"reload did not take effect for {probe}")


# --------------------------------------------------------------------------------------
# moto (S3-compatible server)
# --------------------------------------------------------------------------------------
class MotoServer(_Server):
    """moto's S3 in server mode (``moto_server``) on a free loopback port.

    moto accepts any credentials; clients still need some (boto3, s3fs and GDAL sign every
    request), so tests set ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in the
    environment. State lives in the process and is gone when it stops.

    Attributes
    ----------
    endpoint : str
        ``http://127.0.0.1:PORT``.
    """

    name = "moto"
    stop_signal = signal.SIGTERM

    def __init__(self, startup_timeout: float = 60.0) -> None:
        super().__init__()
        self.startup_timeout = startup_timeout
        self.endpoint = ""

    def _start(self) -> None:
        exe = _venv_exe("moto_server")
        if exe is None:
            raise FileNotFoundError(
                "moto_server not found: pip install 'moto[s3]' flask flask-cors"
            )
        work = self._mkworkdir("popdask-moto-")
        for attempt in range(3):
            port = free_port()
            self._spawn([exe, "-H", "127.0.0.1", "-p", str(port)], cwd=work)
            if not self._serving(f"http://127.0.0.1:{port}/moto-api/data.json", retry=attempt < 2):
                continue
            self.endpoint = f"http://127.0.0.1:{port}"
            return

    def client(self):
        """A boto3 S3 client for this server (credentials from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def upload_tree(self, folder: Path | str, bucket: str, prefix: str = "", suffixes=(".tif",)):
        """Create ``bucket`` (if needed) and upload the files under ``folder`` ending with
        ``suffixes`` to ``s3://bucket/prefix/<relative path>``; returns the number of files."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        folder = Path(folder)
        n = 0
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in suffixes:
                key = "/".join(
                    p for p in (prefix.strip("/"), path.relative_to(folder).as_posix()) if p
                )
                s3.upload_file(str(path), bucket, key)
                n += 1
        return n


class FaultyProxy:
    """An HTTP proxy on loopback in front of a server (moto's S3) that answers 503 SlowDown
    instead of forwarding some requests: every ``every``-th request whose path matches
    ``match`` (a regex), or every one in ``always`` (``{(method, path regex)}``), counting
    what it refused per method and path.

    Runs in the test's process (a thread per connection); :meth:`close` stops it.
    """

    def __init__(self, target: str, *, match: str = r".", every: int = 0) -> None:
        import http.client
        import re
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        host = urlsplit(target)
        self.match, self.every, self.always = re.compile(match), every, set()
        self.refused: Counter = Counter()
        self.requests: list[tuple[str, str]] = []  # every request: (method, path)
        self.seen = 0
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._refuse(self.command, self.path, lock):
                    self._slow_down()
                    return
                conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _slow_down(self) -> None:
                body = (
                    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>injected by the test</Message></Error>"
                )
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _refuse(self, method: str, path: str, lock) -> bool:
        import re

        path = path.split("?")[0]
        with lock:
            self.requests.append((method, path))
            if any(m == method and re.search(p, path) for m, p in self.always):
                self.refused[(method, path)] += 1
                return True
            if not self.every or not self.match.search(path):
                return False
            self.seen += 1
            if self.seen % self.every:
                return False
            self.refused[(method, path)] += 1
            return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def set_env(values: dict) -> dict:
    """Set (or, for None, unset) environment variables of this process; returns their old
    values, which undo it. Picklable: ``client.run(set_env, values)`` does it on workers."""
    import os

    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old
