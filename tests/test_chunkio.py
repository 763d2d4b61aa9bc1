"""ChunkArray reads and writes the bytes zarr does, in the calling thread."""

import os

import numcodecs
import numpy as np
import pytest
import zarr

from popdask.chunkio import ChunkArray, write_array

BLOSC = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)


def make(root, name="a", *, shape=(10, 9), chunks=(4, 4), dtype="f4", fill=np.nan, **kw):
    """A Zarr v2 array as popdask's store makes them (Blosc, edge chunks cut by the shape)."""
    return zarr.create_array(
        str(root),
        name=name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        zarr_format=2,
        compressors=kw.pop("compressors", [BLOSC]),
        **kw,
    )


@pytest.fixture
def values():
    return np.random.default_rng(0).normal(size=(10, 9)).astype(np.float32)


def test_reads_any_window_zarr_wrote(tmp_path, values):
    make(tmp_path)[...] = values
    a = ChunkArray(str(tmp_path), "a")
    assert (a.shape, a.chunks, a.dtype) == ((10, 9), (4, 4), np.float32)
    for ys, xs in [(slice(0, 4), slice(0, 4)), (slice(3, 10), slice(2, 9)), (slice(None),) * 2]:
        np.testing.assert_array_equal(a.read((ys, xs)), values[ys, xs])


def test_zarr_reads_whole_chunks_written_here_edge_chunks_included(tmp_path, values):
    arr = make(tmp_path)
    a = ChunkArray(str(tmp_path), "a")
    a.write((slice(0, 8), slice(4, 9)), values[:8, 4:])  # 2 × 2 chunks, the right ones cut
    a.write((slice(8, 10), slice(0, 4)), values[8:, :4])  # a bottom edge chunk
    got = arr[...]
    np.testing.assert_array_equal(got[:8, 4:], values[:8, 4:])
    np.testing.assert_array_equal(got[8:, :4], values[8:, :4])
    assert np.isnan(got[:8, :4]).all()  # never written: the fill value
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".partial")]


def test_leading_index_lists_and_scalars(tmp_path):
    v = np.arange(3 * 10 * 9, dtype=np.int16).reshape(3, 10, 9)
    make(tmp_path, "c", shape=v.shape, chunks=(1, 4, 4), dtype="i2", fill=-1)[...] = v
    a = ChunkArray(str(tmp_path), "c")
    np.testing.assert_array_equal(a.read(([2, 0], slice(1, 9), slice(3, 8))), v[[2, 0], 1:9, 3:8])
    np.testing.assert_array_equal(a.read((1, slice(0, 4), slice(0, 4))), v[1, :4, :4])
    got = a.read(([0, 2], slice(2, 7), [8, 0, 5]))  # lists on two axes: per axis, not paired
    np.testing.assert_array_equal(got, v[[0, 2]][:, 2:7][:, :, [8, 0, 5]])
    a.write((1, slice(4, 8), slice(0, 4)), np.full((4, 4), 7, np.int16))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "c"))[1, 4:8, :4], 7)


def test_missing_chunks_read_as_the_fill_value(tmp_path):
    arr = make(tmp_path, "c", dtype="i2", fill=-1)
    arr[:4, :4] = 5
    got = ChunkArray(str(tmp_path), "c").read((slice(0, 8), slice(0, 8)))
    assert (got[:4, :4] == 5).all() and (got[4:, :] == -1).all() and (got[:, 4:] == -1).all()
    make(tmp_path, "never")  # no chunk at all: one missing key, then several
    never = ChunkArray(str(tmp_path), "never")
    assert np.isnan(never.read((slice(0, 4), slice(0, 4)))).all()
    assert np.isnan(never.read((slice(None), slice(None)))).all()


def test_a_write_that_cuts_a_chunk_is_refused_and_writes_nothing(tmp_path, values):
    arr = make(tmp_path)
    arr[...] = values
    a = ChunkArray(str(tmp_path), "a")
    before = sorted(os.listdir(tmp_path / "a"))
    with pytest.raises(ValueError, match="whole chunks"):
        a.write((slice(0, 4), slice(2, 6)), np.zeros((4, 4), np.float32))
    assert sorted(os.listdir(tmp_path / "a")) == before
    np.testing.assert_array_equal(arr[...], values)


def test_nested_keys_and_no_compressor(tmp_path, values):
    arr = make(tmp_path, compressors=None, chunk_key_encoding={"name": "v2", "separator": "/"})
    a = ChunkArray(str(tmp_path), "a")
    assert a.codec is None and a.key((1, 2)).endswith("a/1/2")
    a.write((slice(4, 8), slice(0, 4)), values[4:8, :4])
    np.testing.assert_array_equal(arr[4:8, :4], values[4:8, :4])
    np.testing.assert_array_equal(a.read((slice(4, 8), slice(0, 4))), values[4:8, :4])


def test_fsspec_urls(values):
    arr = make("memory://chunkio-test")
    a = ChunkArray("memory://chunkio-test", "a")
    a.write((slice(0, 4), slice(0, 8)), values[:4, :8])
    np.testing.assert_array_equal(arr[:4, :8], values[:4, :8])
    np.testing.assert_array_equal(a.read((slice(0, 6), slice(0, 9)))[:4, :8], values[:4, :8])


def test_a_missing_array_is_a_key_error(tmp_path):
    with pytest.raises(KeyError, match="no Zarr v2 array 'nope'"):
        ChunkArray(str(tmp_path), "nope")


@pytest.mark.parametrize("dtype", ["f8", "f4", "i8", "u1", "?"])
def test_write_array_is_read_by_zarr(tmp_path, dtype):
    rng = np.random.default_rng(1)
    values = (rng.normal(size=(7, 3, 2)) * 10).astype(dtype)
    # 3 rows of 3 × 2 per chunk: three chunks, the last one partial
    write_array(str(tmp_path), "g/a", values, codec=BLOSC, chunk_bytes=3 * 6 * values.itemsize)
    z = zarr.open_array(str(tmp_path / "g" / "a"), mode="r")
    assert (z.shape, z.chunks, z.dtype) == (values.shape, (3, 3, 2), values.dtype)
    np.testing.assert_array_equal(z[...], values)
    np.testing.assert_array_equal(ChunkArray(str(tmp_path), "g/a").read((slice(None),) * 3), values)
    assert sorted(os.listdir(tmp_path / "g" / "a")) == [".zarray", "0.0.0", "1.0.0", "2.0.0"]


def test_write_array_one_chunk_and_raw(tmp_path):
    values = np.arange(5.0)
    write_array(str(tmp_path), "b", values)  # no codec: raw bytes
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "b"), mode="r")[...], values)
    assert os.path.getsize(tmp_path / "b" / "0") == values.nbytes


def test_write_array_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="write it through zarr"):
        write_array(str(tmp_path), "s", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="one dimension or more"):
        write_array(str(tmp_path), "z", np.float64(1.0))
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "z")


class _Faulty:
    """A loopback HTTP server over a folder that answers 503 (or 403) for chosen paths,
    a given number of times (None: always); 404 for what is not there."""

    def __init__(self, root):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.faults: dict[str, list] = {}
        faults = self.faults

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_head(self):
                rule = faults.get(self.path)
                if rule and (rule[1] is None or rule[1] > 0):
                    if rule[1] is not None:
                        rule[1] -= 1
                    self.send_error(rule[0])
                    return None
                return super().send_head()

        self.server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path, values):
    make(tmp_path)[:8] = values[:8]  # the chunks of the last row of chunks are never written
    server = _Faulty(tmp_path)
    yield server
    server.close()


def test_a_failed_read_is_an_error_never_fill_data(served, values, monkeypatch):
    """A chunk the server will not give (503) is retried, then an error naming it; only a
    chunk that is not there (404) reads as the fill value."""
    from popdask import chunkio
    from popdask.chunkio import StorageError

    monkeypatch.setattr(chunkio, "RETRY_DELAYS", (0.05, 0.05, 0.05))
    a = ChunkArray(f"{served.url}/", "a")
    got = a.read((slice(None), slice(None)))
    np.testing.assert_array_equal(got[:8], values[:8])
    assert np.isnan(got[8:]).all()  # never written: 404, the fill value
    served.faults["/a/0.1"] = [503, 2]  # fails twice, then is served
    np.testing.assert_array_equal(a.read((slice(0, 4), slice(4, 8))), values[0:4, 4:8])
    assert served.faults["/a/0.1"][1] == 0
    served.faults["/a/1.1"] = [503, None]  # keeps failing
    with pytest.raises(StorageError, match=r"a/1\.1.*after 4 tries"):
        a.read((slice(0, 8), slice(0, 8)))
    served.faults["/a/1.1"] = [403, None]
    with pytest.raises(StorageError, match=r"a/1\.1.*403"):
        a.read((slice(4, 8), slice(4, 8)))


def test_a_failed_write_is_retried_then_an_error_naming_the_key(tmp_path, values, monkeypatch):
    from popdask import chunkio
    from popdask.chunkio import StorageError

    monkeypatch.setattr(chunkio, "RETRY_DELAYS", (0.01, 0.01))
    make(tmp_path)
    (tmp_path / "a" / "0.0").mkdir()  # a folder where the chunk's object must go
    a = ChunkArray(str(tmp_path), "a")
    with pytest.raises(StorageError, match=r"cannot write .*a/0\.0 .*after 3 tries"):
        a.write((slice(0, 4), slice(0, 4)), values[:4, :4])
    np.testing.assert_array_equal(a.read((slice(4, 8), slice(4, 8))), np.full((4, 4), np.nan))
