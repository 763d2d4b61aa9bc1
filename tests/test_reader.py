import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from stackstac.raster_spec import RasterSpec

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
