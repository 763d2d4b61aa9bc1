"""GDAL settings for reading COGs from HTTP(S) and S3, shipped inside every read task.

The settings come from the run configuration's ``read`` section::

    read:
      s3_endpoint: http://127.0.0.1:9000   # an S3-compatible server (MinIO, Ceph, moto...)
      requester_pays: false                # true: AWS_REQUEST_PAYER=requester
      gdal: {GDAL_HTTP_MAX_RETRY: "8"}     # any GDAL configuration option; wins over ours

:func:`gdal_env` turns it into a stackstac :class:`~stackstac.rio_env.LayeredEnv`.
stackstac pickles that object together with each asset's reader, so the options reach
every worker inside every task and apply only around its opens and reads (a
``rasterio.Env``); nothing depends on the workers' environment except the credentials.

Credentials are never part of these settings (the env travels in the task graph): GDAL
reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or a
profile, or an instance role) from the environment of the process that reads.

What the options do, and why:

- ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``: no directory listing (and no ``.aux.xml`` /
  ``.msk`` probes) when a COG is opened; on object stores a listing costs a request per
  open, and can be slow on prefixes holding thousands of objects.
- ``GDAL_HTTP_MAX_RETRY`` / ``GDAL_HTTP_RETRY_DELAY``: GDAL retries HTTP 429, 500, 502,
  503, 504 and connection errors itself, waiting ``RETRY_DELAY`` seconds first and about
  twice as long (with jitter) each time after: exponential back-off.
- ``GDAL_HTTP_CONNECTTIMEOUT`` / ``GDAL_HTTP_TIMEOUT``: a stuck server fails the request
  (and so the retry logic runs) instead of hanging a worker forever.
- ``GDAL_HTTP_MULTIRANGE`` / ``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES``: the blocks a window
  needs are fetched in as few range requests as possible.
- ``VSI_CACHE`` and ``CPL_VSIL_CURL_CACHE_SIZE``: the block cache of downloaded byte ranges
  (per open file, and one global LRU cache per process shared by every handle), so a
  header or block read twice (a dataset reopened by :class:`popdask.reader.ClosingReader`)
  is not fetched twice.
- ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS``: GDAL's network layer only opens these file types.
- With ``s3_endpoint``: ``AWS_S3_ENDPOINT`` (host[:port], no scheme), ``AWS_HTTPS``
  (``NO`` for an ``http://`` endpoint) and ``AWS_VIRTUAL_HOSTING=FALSE`` (path-style
  requests: ``http://host:port/bucket/key``, what S3-compatible servers serve).
- With ``requester_pays``: ``AWS_REQUEST_PAYER=requester`` (buckets such as
  ``s3://sentinel-s2-l2a`` bill the reader).

GDAL also remembers, for the life of the process, that opening a URL failed (an HTTP 500
once is enough): later opens of that URL fail at once without asking the server again,
so a retry — or a rerun on the same long-lived dask workers — cannot succeed even after
the server has recovered. :func:`forget` drops what GDAL cached about one URL; the reader
calls it after each failed read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from popdask.secrets import is_secret_gdal_option

if TYPE_CHECKING:  # pragma: no cover
    from stackstac.rio_env import LayeredEnv

    from popdask.config import ReadConfig

__all__ = [
    "BASE_OPTIONS",
    "GdalConfigError",
    "forget",
    "gdal_env",
    "gdal_options",
    "s3_endpoint_options",
]

log = logging.getLogger(__name__)

#: Options for every cloud read, whatever the ``read`` section says.
BASE_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    "GDAL_HTTP_TIMEOUT": "120",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "VSI_CACHE": "TRUE",
    "CPL_VSIL_CURL_CACHE_SIZE": str(64 * 1024 * 1024),
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.h5,.nc",
}


class GdalConfigError(ValueError):
    """The ``read`` section cannot be turned into GDAL options; the message names the key."""


def s3_endpoint_options(endpoint: str) -> dict[str, str]:
    """GDAL options for an S3-compatible server at ``endpoint``.

    Parameters
    ----------
    endpoint : str
        ``http://host:port`` or ``https://host[:port]``; a bare ``host[:port]`` means HTTPS.

    Returns
    -------
    dict of str to str
        ``AWS_S3_ENDPOINT`` (host and port, no scheme), ``AWS_HTTPS`` and
        ``AWS_VIRTUAL_HOSTING=FALSE``.

    Raises
    ------
    GdalConfigError
        When the endpoint has another scheme, no host, or a path.

    Examples
    --------
    >>> s3_endpoint_options("http://127.0.0.1:9000")["AWS_S3_ENDPOINT"]
    '127.0.0.1:9000'
    """
    raw = endpoint.strip()
    parts = urlsplit(raw if "://" in raw else f"https://{raw}")
    if parts.scheme not in ("http", "https"):
        raise GdalConfigError(
            f"read.s3_endpoint {endpoint!r}: the scheme must be http:// or https://"
        )
    if not parts.netloc or parts.path.strip("/") or parts.query:
        raise GdalConfigError(
            f"read.s3_endpoint {endpoint!r}: give the server only, like http://127.0.0.1:9000 "
            "(the bucket belongs in the asset hrefs: s3://bucket/key)"
        )
    return {
        "AWS_S3_ENDPOINT": parts.netloc,
        "AWS_HTTPS": "YES" if parts.scheme == "https" else "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def gdal_options(read: ReadConfig | Mapping[str, Any] | None = None) -> dict[str, str]:
    """The GDAL configuration options for cloud reads under a ``read`` section.

    Parameters
    ----------
    read : ReadConfig or mapping, optional
        The run configuration's ``read`` section (or its dict form); None for the defaults.

    Returns
    -------
    dict of str to str
        :data:`BASE_OPTIONS`, then the endpoint and requester-pays options, then
        ``read.gdal`` (which wins).

    Raises
    ------
    GdalConfigError
        On a malformed ``s3_endpoint`` or a credential in ``read.gdal``.
    """
    if read is None:
        s3_endpoint, requester_pays, extra = None, False, {}
    elif isinstance(read, Mapping):
        s3_endpoint = read.get("s3_endpoint")
        requester_pays = bool(read.get("requester_pays", False))
        extra = dict(read.get("gdal") or {})
    else:
        s3_endpoint, requester_pays, extra = read.s3_endpoint, read.requester_pays, read.gdal
    # never accepted: the options travel in every task graph
    secret = sorted(k for k in extra if is_secret_gdal_option(k))
    if secret:
        raise GdalConfigError(
            f"read.gdal: {', '.join(secret)} must not be in the configuration (it would travel "
            "in every task); set it in the environment of the client and the workers instead"
        )
    options = dict(BASE_OPTIONS)
    if s3_endpoint:
        options.update(s3_endpoint_options(s3_endpoint))
    if requester_pays:
        options["AWS_REQUEST_PAYER"] = "requester"
    options.update({str(k): _gdal_str(v) for k, v in extra.items()})
    return options


def gdal_env(read: ReadConfig | Mapping[str, Any] | None = None) -> LayeredEnv:
    """The stackstac ``LayeredEnv`` for reading COGs under a ``read`` section.

    stackstac's own layers are kept (``VSI_CACHE`` on while opening, off while reading
    pixel data, so block reads do not evict the cached headers); :func:`gdal_options` is
    added to the ``always`` layer. Pass it as ``stackstac.stack(..., gdal_env=...)``.

    Parameters
    ----------
    read : ReadConfig or mapping, optional
        The run configuration's ``read`` section; None for the defaults.

    Returns
    -------
    stackstac.rio_env.LayeredEnv
        Picklable; it travels with each reader to the workers.
    """
    from stackstac import DEFAULT_GDAL_ENV

    return DEFAULT_GDAL_ENV.updated(always=gdal_options(read))


def _gdal_str(value: Any) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    return str(value)


# --------------------------------------------------------------------------------------
# GDAL's per-process cache of network files
# --------------------------------------------------------------------------------------
_VSI = re.compile(r"/vsi[a-z0-9_]+/[^\"'\s?]+")


def vsi_prefix(href: str) -> str | None:
    """The GDAL virtual path under which GDAL caches ``href``, without any query string.

    ``https://host/a.tif?token`` → ``/vsicurl/https://host/a.tif``; ``s3://b/k.tif`` →
    ``/vsis3/b/k.tif``; a subdataset path holding a ``/vsi…/`` path → that path; local
    files → None (nothing cached).
    """
    from rasterio._path import _parse_path

    try:
        path = _parse_path(href).as_vsi()
    except Exception:  # not a path rasterio understands: look for an embedded one
        path = href
    m = _VSI.search(path)
    return m.group(0) if m else None


@functools.lru_cache(maxsize=1)
def _libgdal() -> ctypes.CDLL | None:
    """The GDAL library rasterio uses (the wheel bundles its own), loaded with ctypes."""
    import rasterio._base  # makes sure GDAL is loaded

    candidates = []
    try:
        with open("/proc/self/maps") as maps:  # Linux: the very library loaded
            candidates += [line.split()[-1] for line in maps if "libgdal" in line]
    except OSError:
        pass
    import rasterio

    here = os.path.dirname(rasterio.__file__)
    for pattern in ("../rasterio.libs/libgdal*", ".dylibs/libgdal*", "../rasterio.libs/gdal*"):
        candidates += sorted(glob.glob(os.path.join(here, pattern)))
    found = ctypes.util.find_library("gdal")
    if found:
        candidates.append(found)
    for path in dict.fromkeys(candidates):
        try:
            lib = ctypes.CDLL(path)
            lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
            lib.VSICurlPartialClearCache.restype = None
            return lib
        except (OSError, AttributeError):
            continue
    return None


def forget(href: str) -> bool:
    """Drop what GDAL cached in this process about the network file ``href``.

    Call it after a failed open or read, before retrying: GDAL keeps the failure (and the
    file's size and blocks) for the life of the process, keyed by URL, and would answer the
    next open from that cache without a request. Signed variants of the URL (same path, any
    query string) are dropped too.

    Parameters
    ----------
    href : str
        ``http(s)://``, ``s3://``, ``gs://``, ... URL, GDAL ``/vsi…/`` path or subdataset
        path holding one.

    Returns
    -------
    bool
        True when a cache entry prefix was cleared; False for local files, or when the
        GDAL library cannot be reached (then a retry may still hit the cached failure).
    """
    prefix = vsi_prefix(href)
    if prefix is None:
        return False
    lib = _libgdal()
    if lib is None:  # pragma: no cover - every rasterio build ships a loadable GDAL
        log.debug("cannot load GDAL with ctypes; its cache of %s stays", prefix)
        return False
    lib.VSICurlPartialClearCache(prefix.encode())
    return True
