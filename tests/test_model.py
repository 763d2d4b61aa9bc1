import json

import numpy as np
import pytest

from popdask.features import transform
from popdask.model import PixelModel, fit_model, sample_tile

KINDS = ["reflectance"] * 4 + ["backscatter_db", "radiance"]
BANDS = ["B02", "B03", "B04", "B08", "vv", "avg_rad"]


@pytest.fixture(scope="module")
def blobs():
    """Pixels from 6 well separated land-cover types."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0.02, 0.5, (6, 4))
    lab = rng.integers(0, 6, 30000)
    refl = centres[lab] * rng.lognormal(0, 0.02, (lab.size, 4))
    vv = -15 + 2 * lab + rng.normal(0, 0.2, lab.size)
    lights = 3.0 * lab + rng.gamma(1, 0.1, lab.size)
    return np.column_stack([refl, vv, lights]).astype(np.float32), lab


def test_transform_kinds():
    v = np.array([[0.1, -12.0, 3.0], [np.nan, -50.0, -1.0]], np.float32)
    out = transform(v, ["reflectance", "backscatter_db", "radiance"], axis=-1)
    assert out[0, 0] == pytest.approx(np.log(0.115))
    assert np.isnan(out[1, 0]) and out[1, 1] == -35.0 and out[1, 2] == 0.0
    with pytest.raises(ValueError, match="kinds"):
        transform(v, ["reflectance"], axis=-1)
    raw = transform(v, ["reflectance", "backscatter_db", "radiance"], axis=-1, kind="raw")
    np.testing.assert_array_equal(raw, np.float32([[0.1, -12.0, 3.0], [np.nan, -35.0, -1.0]]))
    with pytest.raises(ValueError, match="transform"):
        transform(v, ["reflectance", "backscatter_db", "radiance"], axis=-1, kind="sqrt")


def test_fit_recovers_land_cover_types(blobs):
    x, lab = blobs
    m = fit_model(x, BANDS, KINDS, components=4, clusters=6, seed=0)
    pred = m.predict(x)
    # every true type maps (almost) onto a single cluster
    purity = sum(np.bincount(pred[lab == k]).max() for k in range(6)) / lab.size
    assert purity > 0.97
    assert m.components.shape == (4, 6) and m.centroids.shape == (6, 4)


def test_labels_blockwise_and_nodata(blobs):
    x, _ = blobs
    m = fit_model(x, BANDS, KINDS, components=3, clusters=6, seed=1)
    tile = x[:2500].T.reshape(6, 50, 50).copy()
    tile[0, 0, 0] = np.nan  # missing reflectance → no label
    tile[4, 0, 1] = np.nan  # missing radar → imputed, still labelled
    lab = m.labels(tile)
    assert lab.dtype == np.int16 and lab.shape == (50, 50)
    assert lab[0, 0] == -1 and lab[0, 1] >= 0
    np.testing.assert_array_equal(lab.ravel()[2:], m.predict(x[2:2500]))
    with pytest.raises(ValueError, match="bands"):
        m.labels(tile[:3])


def test_model_round_trips_as_plain_arrays(tmp_path, blobs):
    x, _ = blobs
    m = fit_model(x, BANDS, KINDS, components=3, clusters=6, seed=0)
    arrays, attrs = m.to_arrays()
    np.savez(tmp_path / "m.npz", **arrays)  # plain arrays: no object dtype, no pickle
    (tmp_path / "m.json").write_text(json.dumps(attrs))
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        back = PixelModel.from_arrays(dict(z), json.loads((tmp_path / "m.json").read_text()))
    np.testing.assert_array_equal(back.predict(x[:1000]), m.predict(x[:1000]))
    with pytest.raises(ValueError, match="lacks arrays"):
        PixelModel.from_arrays({"mean": arrays["mean"]}, attrs)


def test_fit_refuses_too_few_pixels(blobs):
    x, _ = blobs
    with pytest.raises(ValueError, match="sample_pixels"):
        fit_model(x[:100], BANDS, KINDS, clusters=50)


def test_sample_tile_draws_valid_pixels():
    comp = np.random.default_rng(0).uniform(size=(3, 40, 40)).astype(np.float32)
    comp[:, :20] = np.nan
    s = sample_tile(comp, 100, seed=3)
    assert s.shape == (100, 3) and np.isfinite(s).all()
    np.testing.assert_array_equal(s, sample_tile(comp, 100, seed=3))
    assert sample_tile(comp, 10_000, seed=3).shape == (800, 3)


def test_sample_tile_draws_pixels_with_every_required_band():
    """A pixel missing a reflectance is never drawn (the fit would drop it); one missing
    only a band that is not required (radar, lights) is."""
    comp = np.random.default_rng(1).uniform(size=(3, 40, 40)).astype(np.float32)
    comp[0, :10] = np.nan  # a reflectance missing in the first 10 rows
    comp[2, 30:] = np.nan  # the radar band missing in the last 10 rows
    s = sample_tile(comp, 10_000, seed=3, required=[True, True, False])
    assert s.shape == (1200, 3) and np.isfinite(s[:, :2]).all()
    assert np.isnan(s[:, 2]).sum() == 400
    assert sample_tile(comp, 10_000, seed=3).shape == (800, 3)  # default: every band


@pytest.mark.parametrize("whiten", [False, True])
def test_full_batch_kmeans_with_or_without_whitening(tmp_path, blobs, whiten):
    """Both k-means and both PCA spaces find the types; labels use the space fitted in, and a
    saved model keeps it (a store of older versions, without the attribute, was whitened)."""
    x, lab = blobs
    m = fit_model(x, BANDS, KINDS, components=4, clusters=6, seed=0, kmeans="lloyd", whiten=whiten)
    pred = m.predict(x)
    assert sum(np.bincount(pred[lab == k]).max() for k in range(6)) / lab.size > 0.97
    p, _ = m.project(x[:2000])
    z = (transform(x[:2000], KINDS, axis=-1, kind=m.transform) - m.mean) / m.std
    q = (z - m.pca_mean) @ m.components.T
    np.testing.assert_allclose(p, q / np.sqrt(m.explained_variance) if whiten else q, atol=1e-3)
    arrays, attrs = m.to_arrays()
    assert attrs["whiten"] is whiten
    back = PixelModel.from_arrays(arrays, json.loads(json.dumps(attrs)))
    np.testing.assert_array_equal(back.predict(x[:1000]), pred[:1000])
    old = {k: v for k, v in attrs.items() if k not in ("whiten", "transform")}
    legacy = PixelModel.from_arrays(arrays, old)
    assert legacy.whiten is True and legacy.transform == "log"
    with pytest.raises(ValueError, match="kmeans"):
        fit_model(x, BANDS, KINDS, clusters=6, kmeans="elkan")
