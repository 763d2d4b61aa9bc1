"""The raster reader stackstac uses inside each task: sign, read once, close, retry.

stackstac keeps every asset's dataset open until its task ends. With the whole time
column of a tile in one task (what the median needs) that is hundreds of open datasets,
and GDAL makes each new warped dataset slower the more are open: measured on the demo,
53 ms per asset with all kept open against 4–7 ms when each is closed after its read.
:class:`ClosingReader` closes its dataset right after reading (it reopens if read
again), and retries transient read failures with back-off before giving up.

Signed catalogs (the Planetary Computer's SAS tokens last about 45 minutes) are signed here,
inside the read task, right before each open — never when the graph is built, so a run of
many hours never reads with an expired token. stackstac builds its readers with fixed
keyword arguments and pickles them with a fixed state, so the signing mode is the reader's
class: :class:`SigningReader` subclasses, one per signer (:func:`reader_for`). The signed
href lives only for the open: messages, exceptions and the log records of stackstac and
rasterio never carry its query string (:func:`redact`).

Nearest-neighbour reads onto another grid (Sentinel-2 and Sentinel-1 granules in UTM warped
to EPSG:3035) skip GDAL's per-asset warp: GDAL warps, once per source geometry and output
window, a raster holding each source pixel's index, through the very ``WarpedVRT`` stackstac
would build (same grid, blocks and transformer, so the same source pixel for every output
pixel), and each asset of that geometry — the 13 bands of a granule — is then read raw and
gathered with that index map (:class:`NearestGather`). Measured on one 10 km tile of the demo
(252 Sentinel-2 assets, ``benchmarks/composite_profile.py``): open + read 5.3 s through
stackstac's masked warped read, 1.8 s gathered; values identical.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import rasterio
import rasterio.errors
from pyproj import Transformer
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import from_bounds as window_from_bounds
from stackstac.rio_reader import (
    MULTITHREADED_DRIVER_ALLOWLIST,
    AutoParallelRioReader,
    SelfCleaningDatasetReader,
    SingleThreadedRioDataset,
    ThreadLocalRioDataset,
    exception_matches,
    nodata_for_window,
)

from popdask.gdal import forget

log = logging.getLogger(__name__)

RETRIES = 3
BACKOFF_S = 0.5

_URL = re.compile(r"https?://[^\s'\"<>]+")
_QUERY = re.compile(r"((?:https?://|/)[^\s'\"?<>]*)\?[^\s'\"<>]*")


def redact(text: str) -> str:
    """``text`` with the query string of every URL in it removed (tokens live there)."""
    return _QUERY.sub(r"\1", str(text))


def sign_embedded(path: str, signer: Callable[[str], str]) -> str:
    """Sign every http(s) URL inside a GDAL path with ``signer``.

    Works for a plain URL, ``/vsicurl/https://…`` and subdataset paths such as
    ``HDF5:"/vsicurl/https://…/f.h5"://grid/field``; local paths pass through unchanged.
    """
    return _URL.sub(lambda m: signer(m.group(0)), path)


class _RedactFilter(logging.Filter):
    """Strip URL query strings from the records of loggers that may print a signed href."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


_FILTER = _RedactFilter()
for _name in (
    "stackstac.timer",
    "stackstac.rio_reader",
    "rasterio",
    "rasterio._env",
    "rasterio._base",
    "rasterio._io",
    "rasterio.env",
    __name__,
):
    _logger = logging.getLogger(_name)
    if _FILTER not in _logger.filters:
        _logger.addFilter(_FILTER)


# --------------------------------------------------------------------------------------
# Nearest-neighbour warps as index maps, shared by the assets of one source geometry
# --------------------------------------------------------------------------------------
#: Index maps kept per process (each at most one output window of int32: 1 MB for 500²).
#: A map serves one tile (its output window): the assets of a tile are read item by item,
#: each item's bands in a row, so the tile's few granule geometries are all that need to be
#: kept; more would only hold earlier tiles' maps (memory growing with the region).
INDEX_CACHE_SIZE = 16
#: Source pixels added around the source window computed from the output window's bounds.
SOURCE_MARGIN_PX = 4

_index_cache: OrderedDict[tuple, tuple[Window | None, np.ndarray | None]] = OrderedDict()
_index_lock = threading.Lock()


_transformers = threading.local()


def _transformer(epsg: int, crs) -> Transformer:
    """A PROJ transformer from ``EPSG:epsg`` to ``crs``, made once per thread and pair: making
    one reads PROJ's database, 50–130 ms here (``rasterio.warp.transform_bounds`` makes one
    per call, once per granule geometry and tile); using it takes well under 1 ms."""
    cache = getattr(_transformers, "cache", None)
    if cache is None:
        cache = _transformers.cache = {}
    key = (epsg, crs.to_wkt())
    if key not in cache:
        cache[key] = Transformer.from_crs(f"EPSG:{epsg}", key[1], always_xy=True)
    return cache[key]


def _source_window(ds, spec, window: Window) -> Window | None:
    """The window of ``ds`` holding every source pixel the output ``window`` can map to."""
    left, bottom, right, top = window_bounds(window, spec.transform)
    sb = _transformer(spec.epsg, ds.crs).transform_bounds(left, bottom, right, top, densify_pts=21)
    w = window_from_bounds(*sb, transform=ds.transform)
    col0 = max(int(np.floor(w.col_off)) - SOURCE_MARGIN_PX, 0)
    row0 = max(int(np.floor(w.row_off)) - SOURCE_MARGIN_PX, 0)
    col1 = min(int(np.ceil(w.col_off + w.width)) + SOURCE_MARGIN_PX, ds.width)
    row1 = min(int(np.ceil(w.row_off + w.height)) + SOURCE_MARGIN_PX, ds.height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


def nearest_index_map(ds, spec, window: Window) -> tuple[Window | None, np.ndarray | None]:
    """Which source pixel GDAL's nearest warp puts in each pixel of the output ``window``.

    GDAL warps an int32 raster of source pixel numbers (1-based; 0 = no source) over the
    source window through a ``WarpedVRT`` with stackstac's parameters (the output grid
    ``spec``, so the same blocks and approximate transformer as stackstac's own read).

    Returns
    -------
    src_window, index
        The source window to read, and ``(window.height, window.width)`` int32 flat indices
        into it (−1: no source pixel); ``(None, None)`` when nothing of ``ds`` falls in
        ``window``.
    """
    key = (
        ds.crs.to_wkt(),
        tuple(ds.transform),
        ds.width,
        ds.height,
        spec.epsg,
        tuple(spec.transform),
        spec.shape,
        (window.col_off, window.row_off, window.width, window.height),
    )
    with _index_lock:
        hit = _index_cache.get(key)
        if hit is not None:
            _index_cache.move_to_end(key)
            return hit
    src_win = _source_window(ds, spec, window)
    result: tuple[Window | None, np.ndarray | None] = (None, None)
    if src_win is not None:
        h, w = int(src_win.height), int(src_win.width)
        numbers = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)
        profile = {
            "driver": "GTiff",
            "width": w,
            "height": h,
            "count": 1,
            "dtype": "int32",
            "crs": ds.crs,
            "transform": ds.window_transform(src_win),
            "nodata": 0,
        }
        with rasterio.MemoryFile() as mem:
            with mem.open(**profile) as dst:
                dst.write(numbers, 1)
            with (
                mem.open() as src,
                WarpedVRT(
                    src, sharing=False, resampling=Resampling.nearest, **spec.vrt_params
                ) as vrt,
            ):
                index = vrt.read(1, window=window) - 1
        if (index >= 0).any():
            result = (src_win, index)
    with _index_lock:
        _index_cache[key] = result
        while len(_index_cache) > INDEX_CACHE_SIZE:
            _index_cache.popitem(last=False)
    return result


class NearestGather:
    """A single-band dataset read onto the output grid by gathering with an index map.

    Stands where stackstac keeps its ``ThreadLocalRioDataset``; :meth:`read_grid` returns
    what stackstac's masked, warped, filled read returns.
    """

    def __init__(self, env, ds, spec):
        self.env, self.ds, self.spec = env, ds, spec
        self._lock = threading.Lock()

    def read_grid(self, window: Window, *, dtype, fill_value, scale_offset) -> np.ndarray:
        shape = (int(window.height), int(window.width))
        with self._lock, self.env.read:
            src_win, index = nearest_index_map(self.ds, self.spec, window)
            out = np.full(shape, fill_value, dtype)
            if src_win is None:
                return out
            raw = self.ds.read(1, window=src_win, out_dtype=dtype).ravel()
        valid = index >= 0
        values = raw[index[valid]]
        nodata = self.ds.nodata
        if nodata is not None:
            bad = np.isnan(values) if np.isnan(nodata) else values == np.array(nodata, dtype)
        scale, offset = scale_offset  # in float64, as NumPy does on stackstac's masked array
        if scale != 1:
            values = (values * np.float64(scale)).astype(dtype, copy=False)
        if offset != 0:
            values = (values + np.float64(offset)).astype(dtype, copy=False)
        if nodata is not None:
            values[bad] = fill_value
        out[valid] = values
        return out

    def close(self) -> None:
        with self._lock:
            self.ds.close()


#: Read errors that mean the asset is not there (the catalog lists a file its storage no
#: longer has): read as nodata and counted (:func:`count_filled`), never retried. Every
#: other error is retried and then fails the tile. (stackstac's own ``errors_as_nodata`` is
#: off: the fill is decided and counted here only.)
NOT_FOUND = (rasterio.errors.RasterioIOError("HTTP response code: 404"),)

_filled = threading.local()


@contextmanager
def count_filled() -> Iterator[list[str]]:
    """The (redacted) hrefs of the reads filled as nodata in this thread while inside: a
    tile task counts its losses with it."""
    previous = getattr(_filled, "hrefs", None)
    _filled.hrefs = hrefs = []
    try:
        yield hrefs
    finally:
        _filled.hrefs = previous


def _note_filled(url: str) -> None:
    hrefs = getattr(_filled, "hrefs", None)
    if hrefs is not None:
        hrefs.append(redact(url))


class ClosingReader(AutoParallelRioReader):
    """stackstac's reader, closing its dataset after each read and retrying failures.

    Single-band GeoTIFFs read with nearest resampling onto another grid, whose only mask is
    their nodata value, are read raw and gathered with a cached index map
    (:class:`NearestGather`); anything else goes through stackstac's warped read.
    stackstac's ``errors_as_nodata`` is ignored: only a missing file (:data:`NOT_FOUND`) is
    read as nodata, and counted; any other error (a truncated file, a failed range read) is
    retried, then fails the tile.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.errors_as_nodata = ()

    def _clean(self, text: str) -> str:
        return redact(text)

    def _open(self):
        if self.resampling != Resampling.nearest:
            return super()._open()
        with self.gdal_env.open:
            try:
                ds = SelfCleaningDatasetReader(self.url, sharing=False)
            except Exception as e:  # a missing file is filled and counted by read()
                raise RuntimeError(f"Error opening {self.url!r}: {e!r}") from e
            if ds.count != 1:
                ds.close()
                return super()._open()  # stackstac raises its multi-band error
            same_grid = self.spec.vrt_params == {
                "crs": ds.crs.to_epsg(),
                "transform": ds.transform,
                "height": ds.height,
                "width": ds.width,
            }
            flags = ds.mask_flag_enums[0]
            if (
                not same_grid
                and ds.driver in MULTITHREADED_DRIVER_ALLOWLIST
                and flags in ([MaskFlags.nodata], [MaskFlags.all_valid])
            ):
                return NearestGather(self.gdal_env, ds, self.spec)
            # stackstac's own dataset (as AutoParallelRioReader._open builds it)
            vrt = None
            if not same_grid:
                with self.gdal_env.open_vrt:
                    vrt = WarpedVRT(
                        ds,
                        sharing=False,
                        resampling=self.resampling,
                        add_alpha=ds.nodata is None,
                        **self.spec.vrt_params,
                    )
        if ds.driver in MULTITHREADED_DRIVER_ALLOWLIST:
            return ThreadLocalRioDataset(self.gdal_env, ds, vrt=vrt)
        return SingleThreadedRioDataset(self.gdal_env, ds, vrt=vrt)

    def _read_once(self, window: Window, **kwargs) -> np.ndarray:
        dataset = self.dataset
        if isinstance(dataset, NearestGather) and not kwargs:
            try:
                return dataset.read_grid(
                    window,
                    dtype=self.dtype,
                    fill_value=self.fill_value,
                    scale_offset=self.scale_offset,
                )
            except Exception as e:
                raise RuntimeError(f"Error reading {window} from {self.url!r}: {e!r}") from e
        return super().read(window, **kwargs)

    def read(self, window: Window, **kwargs) -> np.ndarray:
        for attempt in range(RETRIES + 1):
            try:
                return self._read_once(window, **kwargs)
            except RuntimeError as e:
                forget(self.url)  # GDAL caches failed opens per process: ask again
                text = str(e)
                cause = e.__cause__ or e
                clean, clean_cause = self._clean(text), self._clean(str(cause))
                if exception_matches(cause, NOT_FOUND):  # gone: no retry heals it
                    warnings.warn(f"{clean}; read as nodata", stacklevel=2)
                    _note_filled(self.url)
                    return nodata_for_window(window, self.fill_value, self.dtype)
                if attempt == RETRIES:
                    if clean == text:
                        raise
                    raise RuntimeError(clean) from None
                wait = BACKOFF_S * 2**attempt
                log.warning(
                    "read of %s failed (%s); retry %d in %.1f s",
                    redact(self.url),
                    clean_cause,
                    attempt + 1,
                    wait,
                )
                time.sleep(wait)
            finally:
                # Reopened on the next read; a fresh open also bypasses a failed handle.
                self.close()
        raise AssertionError("unreachable")  # pragma: no cover


class SigningReader(ClosingReader):
    """A :class:`ClosingReader` that signs its href inside the task, right before each open.

    Subclasses set :meth:`sign_href`. ``self.url`` stays unsigned (it is what stackstac
    pickles and prints); the signed path exists only while the dataset is opened, and is
    fetched again at every open, so retries and reopens pick up a fresh token.
    """

    @staticmethod
    def sign_href(href: str) -> str:
        """The signed form of one URL (override in subclasses)."""
        raise NotImplementedError

    def _clean(self, text: str) -> str:
        signed = getattr(self, "_signed", None)
        if signed:
            text = str(text).replace(signed, self.url)
        return redact(text)

    def _open(self):
        unsigned = self.url
        signed = sign_embedded(unsigned, type(self).sign_href)
        self._signed = signed
        self.url = signed
        try:
            return super()._open()
        except Exception as e:
            raise RuntimeError(self._clean_with(e, signed, unsigned)) from None
        finally:
            self.url = unsigned

    @staticmethod
    def _clean_with(e: BaseException, signed: str, unsigned: str) -> str:
        text = str(e)
        cause = e.__cause__
        if cause is not None and str(cause) not in text:
            text = f"{text} ({cause})"
        return redact(text.replace(signed, unsigned))


def _planetary_computer_sign(href: str) -> str:
    import planetary_computer  # tokens cached per process, renewed < 60 s before expiry

    return planetary_computer.sign(href)


class PlanetaryComputerReader(SigningReader):
    """Signs Azure Blob hrefs with ``planetary_computer.sign`` (other hosts unchanged)."""

    sign_href = staticmethod(_planetary_computer_sign)


#: Signing mode (``sign:`` in the configuration) → reader class.
SIGNING_READERS: dict[str, type[SigningReader]] = {
    "planetary_computer": PlanetaryComputerReader,
}
_NEEDS = {"planetary_computer": ("planetary_computer", "planetary-computer")}


def reader_for(sign: str | None) -> type[ClosingReader]:
    """The reader class for a signing mode, checked on the client before any task runs.

    Raises
    ------
    ValueError
        For an unknown mode, or when the signer's package is not installed.
    """
    if sign is None:
        return ClosingReader
    if sign not in SIGNING_READERS:
        raise ValueError(
            f"unknown signing method {sign!r}; known: {', '.join(sorted(SIGNING_READERS))}"
        )
    module, package = _NEEDS[sign]
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"sign: {sign} needs the {package} package: pip install 'popdask[pc]' "
            f"(or pip install {package})"
        )
    return SIGNING_READERS[sign]
