import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from stackstac.raster_spec import RasterSpec
from stackstac.rio_reader import AutoParallelRioReader

from popdask import reader as reader_mod
from popdask.reader import ClosingReader


@pytest.fixture
def cog(tmp_path):
    path = tmp_path / "a.tif"
    data = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=1,
        dtype="uint16",
        crs="EPSG:3035",
        transform=Affine(20, 0, 4321000, 0, -20, 3211280),
        nodata=0,
    ) as dst:
        dst.write(data, 1)
    return path, data


def make(path):
    spec = RasterSpec(
        epsg=3035, bounds=(4321000, 3210000, 4322280, 3211280), resolutions_xy=(20, 20)
    )
    return ClosingReader(
        url=str(path),
        spec=spec,
        resampling=Resampling.nearest,
        dtype=np.dtype("float32"),
        fill_value=np.float32("nan"),
        scale_offset=(1, 0),
    )


def test_reads_then_closes(cog):
    path, data = cog
    r = make(path)
    out = r.read(Window(0, 0, 64, 64))
    np.testing.assert_array_equal(out[1:, 1:], data[1:, 1:].astype(np.float32))
    assert np.isnan(out[0, 0])  # nodata 0 → fill value
    assert r._dataset is None  # closed right after the read
    np.testing.assert_array_equal(r.read(Window(0, 0, 8, 8)), out[:8, :8])  # reopens


def test_transient_failure_is_retried(cog, monkeypatch):
    path, _ = cog
    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.01)
    r = make(path)
    calls = {"n": 0}
    real_open = r._open

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise RuntimeError("TIFFReadEncodedTile() failed")
        return real_open()

    r._open = flaky
    assert r.read(Window(0, 0, 4, 4)).shape == (4, 4)
    assert calls["n"] == 3


def test_persistent_failure_raises_with_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.01)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(RuntimeError, match=r"broken\.tif"):
        make(bad).read(Window(0, 0, 4, 4))


# --------------------------------------------------------------------------------------
# Nearest reads onto another grid: index-map gather, identical to stackstac's warped read
# --------------------------------------------------------------------------------------
SPEC_3035 = RasterSpec(
    epsg=3035, bounds=(4321000, 3210000, 4323000, 3212000), resolutions_xy=(20, 20)
)


def _utm_cog(path, dtype, nodata, seed=0):
    """A 20 m UTM 32N granule over part of SPEC_3035, with nodata holes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 60000, (70, 60)).astype(dtype)
    if nodata is not None:
        data[rng.uniform(size=data.shape) < 0.1] = nodata
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=60,
        height=70,
        count=1,
        dtype=dtype,
        crs="EPSG:32632",
        transform=Affine(20, 0, 569600, 0, -20, 5763000),
        nodata=nodata,
        tiled=True,
        blockxsize=32,
        blockysize=32,
    ) as dst:
        dst.write(data, 1)
    return path


def _pair(path, resampling=Resampling.nearest, **kw):
    args = {
        "url": str(path),
        "spec": SPEC_3035,
        "resampling": resampling,
        "dtype": np.dtype("float32"),
        "fill_value": np.float32("nan"),
        "scale_offset": (1, 0),
        **kw,
    }
    return ClosingReader(**args), AutoParallelRioReader(**args)


CASES = [("uint16", 0), ("float32", np.nan), ("float32", -32768.0), ("uint16", None)]


@pytest.mark.parametrize(("dtype", "nodata"), CASES)
def test_nearest_gather_equals_stackstac_warped_read(tmp_path, dtype, nodata):
    path = _utm_cog(tmp_path / "utm.tif", dtype, nodata)
    ours, theirs = _pair(path)
    assert isinstance(ours.dataset, reader_mod.NearestGather)
    ours.close()
    for window in [Window(0, 0, 100, 100), Window(10, 20, 50, 30), Window(90, 0, 10, 10)]:
        expected = theirs.read(window)
        out = ours.read(window)
        assert out.dtype == np.float32 and out.shape == expected.shape
        np.testing.assert_array_equal(out, expected)
    assert ours._dataset is None  # closed after each read
    assert 0.05 < np.isnan(ours.read(Window(0, 0, 100, 100))).mean() < 0.95  # covers part


def test_nearest_gather_scale_offset_and_index_map_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "_index_cache", reader_mod.OrderedDict())
    a = _utm_cog(tmp_path / "a.tif", "uint16", 0, seed=1)
    b = _utm_cog(tmp_path / "b.tif", "uint16", 0, seed=2)  # same grid: same index map
    for path in (a, b):
        ours, theirs = _pair(path, scale_offset=(1e-4, -0.1))
        np.testing.assert_array_equal(
            ours.read(Window(0, 0, 100, 100)), theirs.read(Window(0, 0, 100, 100))
        )
    assert len(reader_mod._index_cache) == 1


def test_window_without_source_reads_as_fill(tmp_path):
    path = _utm_cog(tmp_path / "utm.tif", "uint16", 0)
    spec = RasterSpec(
        epsg=3035, bounds=(4421000, 3210000, 4423000, 3212000), resolutions_xy=(20, 20)
    )
    ours, theirs = _pair(path, spec=spec)
    out = ours.read(Window(0, 0, 100, 100))
    assert np.isnan(out).all()
    np.testing.assert_array_equal(out, theirs.read(Window(0, 0, 100, 100)))


def test_bilinear_goes_through_the_warped_read(tmp_path):
    path = _utm_cog(tmp_path / "utm.tif", "float32", np.nan)
    ours, theirs = _pair(path, resampling=Resampling.bilinear)
    assert not isinstance(ours.dataset, reader_mod.NearestGather)
    np.testing.assert_array_equal(
        ours.read(Window(0, 0, 100, 100)), theirs.read(Window(0, 0, 100, 100))
    )


def test_a_missing_asset_is_read_as_fill_and_counted(tmp_path, monkeypatch):
    """An asset the catalog lists but its server has not (HTTP 404) reads as nodata, at
    once and counted for the tile (:func:`popdask.reader.count_filled`); stackstac's own
    ``errors_as_nodata`` does not decide it."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from popdask.reader import count_filled

    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.01)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/missing.tif"
        ours, _ = _pair(url, errors_as_nodata=())
        with count_filled() as filled, pytest.warns(UserWarning, match="missing.tif"):
            out = ours.read(Window(0, 0, 8, 8))
        assert out.shape == (8, 8) and np.isnan(out).all()
        assert filled == [url]
        with pytest.warns(UserWarning, match="missing.tif"):
            assert ours.read(Window(0, 0, 8, 8)).shape == (8, 8)  # outside a count: no record
        assert filled == [url]
    finally:
        server.shutdown()
        server.server_close()


def test_a_read_error_other_than_not_found_is_retried_then_fails(tmp_path, monkeypatch):
    """A file that cannot be opened for another reason is never filled silently, even when
    stackstac is told to fill any error."""
    from rasterio.errors import RasterioIOError

    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.01)
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    ours, _ = _pair(tmp_path / "broken.tif", errors_as_nodata=(RasterioIOError(".*"),))
    with pytest.raises(RuntimeError, match=r"broken\.tif"):
        ours.read(Window(0, 0, 8, 8))


def test_a_truncated_cog_is_an_error_where_its_bytes_are_missing(tmp_path, monkeypatch):
    """A COG cut short on disk (an upload that died): its header opens and the windows
    whose tiles remain read as before; a window whose tiles are gone is retried, then an
    error naming the file, never nodata, even when stackstac is told to fill any error."""
    from rasterio.errors import RasterioIOError

    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.01)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 60000, (512, 512), dtype=np.uint16)  # incompressible
    path = tmp_path / "cut.tif"
    profile = dict(
        driver="COG", width=512, height=512, count=1, dtype="uint16", crs="EPSG:3035",
        transform=Affine(20, 0, 4321000, 0, -20, 3211280), nodata=0, blocksize=128,
        compress="deflate", overviews="none",
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * 0.6)])  # the last rows of tiles are gone
    spec = RasterSpec(
        epsg=3035, bounds=(4321000, 3211280 - 512 * 20, 4321000 + 512 * 20, 3211280),
        resolutions_xy=(20, 20),
    )  # fmt: skip
    ours = ClosingReader(
        url=str(path),
        spec=spec,
        resampling=Resampling.nearest,
        dtype=np.dtype("float32"),
        fill_value=np.float32("nan"),
        scale_offset=(1, 0),
        errors_as_nodata=(RasterioIOError(".*"),),
    )
    top = ours.read(Window(0, 0, 512, 128))
    np.testing.assert_array_equal(top, data[:128].astype(np.float32))
    with pytest.raises(RuntimeError, match=r"cut\.tif"):
        ours.read(Window(0, 384, 512, 128))
