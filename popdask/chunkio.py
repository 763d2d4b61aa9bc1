"""Whole-chunk reads and writes of a Zarr v2 array, in the calling thread.

The tasks of the label and predict passes read and write their tile's chunks whole (the
store's chunks are the tiles). zarr-python 3.1 sends every chunk through its event loop
and a thread pool; on a tile-sized task that orchestration cost as much as the decoding
(a 500 × 500 float32 chunk written in 9.6 ms instead of 4.8 ms; the 14 composite chunks of
a tile read in 25 ms instead of 18 ms, benchmarks/README.md). :class:`ChunkArray` does the
same work, fetch, decode with the array's own codec and place, in the caller's thread,
through fsspec, so local paths and URLs with storage options alike. The bytes are Zarr's:
zarr reads what is written here, and the other way round.

Only whole chunks are written (or the part of an edge chunk inside the array); anything
else is refused, since it would need a read-modify-write that tasks never do.
:func:`write_array` makes a new small array in one go (the store's model and fit groups).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numcodecs
import numpy as np
from fsspec.implementations.local import LocalFileSystem

Selection = Sequence["slice | int | Sequence[int]"]

#: The attribute naming what an unwritten chunk of an array reads as (see ChunkArray.missing).
MISSING_ATTR = "popdask_fill_value"


class ChunkArray:
    """A Zarr v2 array's chunks, read and written whole in the calling thread.

    Parameters
    ----------
    path
        The store: a local path or an fsspec URL (``s3://bucket/run.zarr``).
    name
        The array's path in the store (``terms``, ``sample/pixels``).
    storage_options
        fsspec options for a URL.
    """

    def __init__(self, path: str, name: str, storage_options: Mapping[str, Any] | None = None):
        self.fs, self.root = resolve(path, name, storage_options)
        try:
            meta = json.loads(self.fs.cat_file(f"{self.root}/.zarray"))
        except FileNotFoundError:
            raise KeyError(f"no Zarr v2 array {name!r} in {path}") from None
        if meta.get("filters") or meta.get("order", "C") != "C":
            raise ValueError(f"array {name!r}: filters or Fortran order are not supported")
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunks"])
        self.dtype = np.dtype(meta["dtype"])
        self.fill_value = _fill(meta.get("fill_value"), self.dtype)
        self.codec = _codec(meta.get("compressor"), f"{path}: array {name!r}")
        self.separator = meta.get("dimension_separator") or "."

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @functools.cached_property
    def attrs(self) -> dict[str, Any]:
        """The array's attributes (``.zattrs``; empty when it has none)."""
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/.zattrs"))
        except FileNotFoundError:
            return {}

    @functools.cached_property
    def missing(self) -> Any:
        """What a chunk never written reads as: the array's ``popdask_fill_value``
        attribute when it has one (``cluster``: -1, no data, where Zarr's fill value must
        stay unset so that xarray keeps the labels integers), else its fill value."""
        value = self.attrs.get(MISSING_ATTR)
        return self.fill_value if value is None else _fill(value, self.dtype)

    def key(self, index: Sequence[int]) -> str:
        """The path of chunk ``index`` (chunk coordinates)."""
        return f"{self.root}/{self.separator.join(map(str, index))}"

    # -- reading ------------------------------------------------------------------------
    def read(self, selection: Selection) -> np.ndarray:
        """Values of ``selection``: per axis a slice (step 1), a list of indices, or one
        index (whose axis is dropped, as in NumPy)."""
        picks = self._normalise(selection)
        scalar = tuple(
            i for i, s in enumerate(selection) if np.ndim(s) == 0 and not isinstance(s, slice)
        )
        shape = tuple(len(p) if isinstance(p, list) else p.stop - p.start for p in picks)
        out = np.empty(shape, self.dtype)
        per_axis = [self._chunks_of(p, c) for p, c in zip(picks, self.chunks, strict=True)]
        indices = list(itertools.product(*(list(a) for a in per_axis)))
        keys = [self.key(tuple(ci for ci, _, _ in idx)) for idx in indices]
        found = fetch(self.fs, keys)
        for idx, key in zip(indices, keys, strict=True):
            dst = _orthogonal(tuple(d for _, _, d in idx))
            src = _orthogonal(tuple(s for _, s, _ in idx))
            raw = found.get(key)
            if raw is None:
                out[dst] = self.missing
            else:
                out[dst] = self._decode(raw)[src]
        return out.squeeze(axis=scalar) if scalar else out

    def _decode(self, raw: bytes) -> np.ndarray:
        data = self.codec.decode(raw) if self.codec is not None else raw
        return np.frombuffer(data, self.dtype).reshape(self.chunks)

    def _chunks_of(self, pick: slice | list[int], size: int):
        """``(chunk index, slice or indices in the chunk, slice or indices in the output)``
        for each chunk ``pick`` touches along one axis."""
        if isinstance(pick, list):
            where = np.asarray(pick)
            for ci in np.unique(where // size):
                hit = np.flatnonzero(where // size == ci)
                yield int(ci), list(where[hit] - ci * size), list(hit)
            return
        for ci in range(pick.start // size, -(-pick.stop // size)):
            lo, hi = max(pick.start, ci * size), min(pick.stop, (ci + 1) * size)
            yield ci, slice(lo - ci * size, hi - ci * size), slice(lo - pick.start, hi - pick.start)

    # -- writing ------------------------------------------------------------------------
    def write(self, selection: Selection, values: np.ndarray) -> None:
        """Write ``values`` over ``selection`` (per axis a slice or one index), which must
        cover whole chunks (or run to the array's end)."""
        picks = self._normalise(selection)
        if any(isinstance(p, list) for p in picks):
            if any(isinstance(p, list) and len(p) != 1 for p in picks):
                raise ValueError("write takes slices or single indices")
            picks = [slice(p[0], p[0] + 1) if isinstance(p, list) else p for p in picks]
        shape = tuple(p.stop - p.start for p in picks)
        values = np.broadcast_to(np.asarray(values, self.dtype).reshape(shape), shape)
        for p, c, n in zip(picks, self.chunks, self.shape, strict=True):
            if p.start % c or (p.stop % c and p.stop != n):
                raise ValueError(
                    f"selection {picks} does not cover whole chunks of {self.chunks}; "
                    "write through zarr instead"
                )
        ranges = [
            range(p.start // c, -(-p.stop // c)) for p, c in zip(picks, self.chunks, strict=True)
        ]
        for index in itertools.product(*ranges):
            part = tuple(
                slice(ci * c - p.start, min((ci + 1) * c, p.stop) - p.start)
                for ci, c, p in zip(index, self.chunks, picks, strict=True)
            )
            block = values[part]
            if block.shape != self.chunks:  # an edge chunk: the rest is fill
                full = np.full(self.chunks, self.fill_value, self.dtype)
                full[tuple(slice(0, s) for s in block.shape)] = block
                block = full
            block = np.ascontiguousarray(block)
            put(
                self.fs,
                self.key(index),
                self.codec.encode(block) if self.codec else block.tobytes(),
            )

    # -- selections -----------------------------------------------------------------------
    def _normalise(self, selection: Selection) -> list[slice | list[int]]:
        sel = tuple(selection)
        if len(sel) != self.ndim:
            raise ValueError(f"selection has {len(sel)} axes, the array {self.ndim}")
        out: list[slice | list[int]] = []
        for s, n in zip(sel, self.shape, strict=True):
            if isinstance(s, slice):
                start, stop, step = s.indices(n)
                if step != 1:
                    raise ValueError("slices with a step are not supported")
                out.append(slice(start, max(start, stop)))
            elif np.ndim(s) == 0:
                out.append([_index(int(s), n)])
            else:
                out.append([_index(int(i), n) for i in s])
        return out


def write_array(
    path: str,
    name: str,
    values: np.ndarray,
    *,
    codec: numcodecs.abc.Codec | None = None,
    chunk_bytes: int = 16 * 2**20,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write ``values`` as a new Zarr v2 array ``name`` of the store at ``path``, whole.

    The chunks are runs of rows of at most ``chunk_bytes`` each (the whole array when it is
    smaller), compressed with ``codec``; they are written before the ``.zarray``, so a write
    cut short leaves no array that reads as complete. Numeric and boolean dtypes only. The
    run's fit (four arrays, the largest 400 × 300) is saved in 3–4 ms of CPU this way, in
    42–49 ms through zarr-python, while the predict pass's workers share the machine.

    Parameters
    ----------
    path
        The store: a local path or an fsspec URL.
    name
        The array's path in the store (``regression/densities``).
    values
        The array (at least one dimension).
    codec
        A numcodecs compressor, or None for raw bytes.
    chunk_bytes
        Largest uncompressed chunk.
    storage_options
        fsspec options for a URL.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "biuf" or values.ndim == 0:
        raise ValueError(
            f"array {name!r}: only numeric arrays of one dimension or more are written "
            f"whole (got {values.dtype}, {values.ndim} dimensions); write it through zarr"
        )
    values = np.ascontiguousarray(values)
    fs, root = resolve(path, name, storage_options)
    row = values.itemsize * int(np.prod(values.shape[1:]))
    rows = max(1, min(values.shape[0], chunk_bytes // max(row, 1)))
    chunks = (rows, *values.shape[1:])
    fill: Any = False if values.dtype.kind == "b" else 0 if values.dtype.kind in "iu" else 0.0
    meta = {
        "shape": list(values.shape),
        "chunks": list(chunks),
        "dtype": values.dtype.str,
        "fill_value": fill,
        "order": "C",
        "filters": None,
        "dimension_separator": ".",
        "compressor": None if codec is None else codec.get_config(),
        "zarr_format": 2,
    }
    n = values.shape[0]
    for i in range(-(-n // rows)):
        block = values[i * rows : (i + 1) * rows]
        if block.shape[0] < rows:  # the last chunk: the rest is fill
            block = np.concatenate(
                [block, np.zeros((rows - block.shape[0], *chunks[1:]), block.dtype)]
            )
        data = codec.encode(block) if codec is not None else block.tobytes()
        put(fs, f"{root}/{'.'.join(map(str, (i, *(0,) * (values.ndim - 1))))}", data)
    put(fs, f"{root}/.zarray", json.dumps(meta, indent=2).encode())


#: The compressors popdask decodes (those it writes, and the common lossless ones). Any
#: other, above all ``pickle``, whose decoding can run code, is refused before a byte is read.
ALLOWED_CODECS = frozenset({"blosc", "zstd", "lz4", "gzip", "zlib", "bz2", "lzma"})


class CodecError(ValueError):
    """A store's array is compressed with a codec popdask does not read."""


def _codec(config: Mapping[str, Any] | None, where: str):
    """The numcodecs codec of an array's ``compressor``, if popdask allows it."""
    if not config:
        return None
    cid = str(config.get("id"))
    if cid not in ALLOWED_CODECS:
        raise CodecError(
            f"{where} is compressed with the {cid!r} codec, which popdask does not read "
            f"(allowed: {', '.join(sorted(ALLOWED_CODECS))}); the store was not written by "
            "popdask or was altered: do not trust it"
        )
    return numcodecs.get_codec(dict(config))


class StorageError(OSError):
    """A read from the store failed for another reason than a missing chunk (a timeout, a
    5xx, a refused permission), even after retries: never read as fill values."""


#: Seconds to wait before each new try of the chunks whose read failed.
RETRY_DELAYS = (0.2, 1.0, 3.0)


def fetch(fs, keys: Sequence[str], delays: Sequence[float] | None = None) -> dict[str, bytes]:
    """The bytes of each of ``keys`` that exists (fetched together, so an object store
    answers them concurrently); a missing key is absent from the result.

    Any other failure is retried after each of ``delays`` (default :data:`RETRY_DELAYS`),
    then raised as :class:`StorageError` naming the key: a chunk that cannot be read is an
    error, never fill data (fsspec's ``on_error="omit"`` would make it one).
    """
    delays = RETRY_DELAYS if delays is None else delays
    out: dict[str, bytes] = {}
    todo = list(keys)
    for tries, delay in enumerate((*delays, None), start=1):
        if not todo:
            break
        got = fs.cat(todo, on_error="return")  # a list: always a dict
        failed = {}
        for key in todo:
            value = got.get(key)
            if isinstance(value, BaseException) and not isinstance(value, FileNotFoundError):
                failed[key] = value
            elif isinstance(value, bytes | bytearray | memoryview):
                out[key] = value
        if failed and delay is None:
            key, e = next(iter(failed.items()))
            raise StorageError(
                f"cannot read {key} ({type(e).__name__}: {e}) after {tries} tries "
                f"({len(failed)} chunk(s) failed); check the store's storage and credentials"
            ) from e
        todo = list(failed)
        if todo:
            time.sleep(delay)
    return out


def resolve(
    path: str, name: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of the store at ``path`` (a local path or an fsspec URL) and the key of
    ``name`` (an array, a group or a file such as ``.zattrs``) in it."""
    fs, root = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    return fs, f"{root.rstrip('/')}/{name.strip('/')}"


def put(fs, key: str, data: bytes) -> None:
    """Write the object ``key`` of filesystem ``fs`` whole: a killed write leaves no torn one.

    A failed write is retried after each of :data:`RETRY_DELAYS`, then raised as
    :class:`StorageError` naming the key."""
    delays = RETRY_DELAYS
    for tries, delay in enumerate((*delays, None), start=1):
        try:
            _put_once(fs, key, data)
            return
        except Exception as e:
            if delay is None:
                raise StorageError(
                    f"cannot write {key} ({type(e).__name__}: {e}) after {tries} tries; check "
                    "the store's storage, its free space and the credentials"
                ) from e
            time.sleep(delay)


def _put_once(fs, key: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):  # a temporary file, renamed over the key
        os.makedirs(os.path.dirname(key), exist_ok=True)
        tmp = f"{key}.{uuid.uuid4().hex}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, key)
    else:  # object stores replace an object whole
        fs.pipe_file(key, bytes(data))


def _orthogonal(index: tuple) -> tuple:
    """``index`` as NumPy takes it per axis: lists on two or more axes go through ``np.ix_``
    (NumPy would otherwise pair them up); slices alone stay basic indexing, no copy."""
    if sum(isinstance(i, list) for i in index) < 2:
        return index
    return np.ix_(*(np.arange(i.start, i.stop) if isinstance(i, slice) else i for i in index))


def _index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for an axis of {n}")
    return i % n


def _fill(value: Any, dtype: np.dtype):
    """Zarr v2's JSON fill value as a scalar of ``dtype`` (0 when none is set)."""
    if value is None:
        return dtype.type(0)
    if isinstance(value, str) and dtype.kind == "f":
        return dtype.type({"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[value])
    return dtype.type(value)
