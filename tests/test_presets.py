"""Catalog presets, real catalog items, reflectance, signing at read time, UTM seams.

The items are those the Planetary Computer and Earth Search APIs really returned
(``../shared/data/realstac``), plus two hand-written Earth Search items for cases no
recorded one covers (``tests/data/stac/``); nothing here reaches the network.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer

from popdask import composite as comp
from popdask import reader as reader_mod
from popdask.config import ConfigError, SourceConfig, config_from_dict
from popdask.presets import EARTH_SEARCH_S2, PRESETS, S2_BANDS, expand_presets
from popdask.reader import (
    ClosingReader,
    PlanetaryComputerReader,
    SigningReader,
    reader_for,
    redact,
    sign_embedded,
)
from popdask.sources import (
    SourceItems,
    day_groups,
    filter_items,
    item_bounds_3035,
    load_stack,
    plain_items,
    scale_offset,
    subdataset_href,
    tile_composite,
)

DATA = Path(__file__).parent / "data" / "stac"
REALSTAC = Path(__file__).resolve().parents[2] / "shared" / "data" / "realstac"
PC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
ES_URL = "https://earth-search.aws.element84.com/v1"


def base(**stac) -> dict:
    return {
        "region": {"bbox": [4321000, 3210000, 4341000, 3230000]},
        "stac": stac,
        "sources": {"sentinel2": {"datetime": "2021-06-01/2022-10-31"}},
        "census": {"path": "grid.csv"},
        "output": {"path": "out.zarr"},
    }


def with_sources(data: dict, **sources) -> dict:
    return {**data, "sources": {**data["sources"], **sources}}


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------
def test_planetary_computer_preset_fills_catalog_keys():
    data = with_sources(base(preset="planetary-computer"), sentinel1={"datetime": "2021"})
    cfg = config_from_dict(data)
    assert cfg.stac.url == PC_URL and cfg.stac.sign == "planetary_computer"
    s2, s1 = cfg.sources.sentinel2, cfg.sources.sentinel1
    assert s2.collection == "sentinel-2-l2a" and s2.mask_asset == "SCL"
    assert s2.assets == [
        "B01",
        "B02",
        "B03",
        "B04",
        "B05",
        "B06",
        "B07",
        "B08",
        "B8A",
        "B11",
        "B12",
    ]
    assert "B10" not in s2.assets and s2.bands == s2.assets
    assert s2.datetime == "2021-06-01/2022-10-31"  # the user's dates
    assert (s1.collection, s1.assets) == ("sentinel-1-rtc", ["vv", "vh"])
    assert cfg.sources.nightlights is None  # presets never add sources


def test_earth_search_preset_uses_its_keys_and_canonical_band_names():
    cfg = config_from_dict(base(preset="earth-search"))
    assert cfg.stac.url == ES_URL and cfg.stac.sign is None
    s2 = cfg.sources.sentinel2
    assert s2.collection == "sentinel-2-l2a" and s2.mask_asset == "scl"
    assert s2.assets == [
        "coastal",
        "blue",
        "green",
        "red",
        "rededge1",
        "rededge2",
        "rededge3",
        "nir",
        "nir08",
        "swir16",
        "swir22",
    ]
    # Band names are the same whichever catalog the composite comes from.
    assert s2.bands == list(S2_BANDS)
    pc = config_from_dict(base(preset="planetary-computer")).sources.sentinel2
    assert s2.bands == pc.bands


def test_user_keys_win_merged_per_source():
    data = with_sources(
        base(preset="earth-search"),
        sentinel2={
            "datetime": "2022-06-01/2022-09-30",
            "assets": ["B02", "red", "B8A", "nir09"],  # canonical or catalog keys, mixed
            "mask_asset": "SCL",
            "max_cloud_cover": 15,
            "rename": {"nir09": "WV"},
        },
    )
    s2 = config_from_dict(data).sources.sentinel2
    assert s2.assets == ["blue", "red", "nir08", "nir09"]
    assert s2.bands == ["B02", "B04", "B8A", "WV"]
    assert s2.mask_asset == "scl" and s2.max_cloud_cover == 15
    assert s2.rename["blue"] == "B02" and s2.rename["nir09"] == "WV"  # merged per asset
    assert s2.collection == "sentinel-2-l2a"  # not given: from the preset
    over = config_from_dict(base(preset="planetary-computer", url="http://mirror:8080/stac"))
    assert over.stac.url == "http://mirror:8080/stac" and over.stac.sign == "planetary_computer"


def test_per_source_preset_and_own_url_sources():
    data = with_sources(
        base(preset="earth-search"),
        sentinel1={"preset": "planetary-computer", "datetime": "2021"},
        nightlights={
            "url": "http://lights/stac",
            "collection": "vnp46a2",
            "datetime": "2021",
            "assets": ["data"],
            "subdataset": "HDF5://HDFEOS/GRIDS/G/Data_Fields/NTL",
        },
    )
    cfg = config_from_dict(data)
    s1, nl = cfg.sources.sentinel1, cfg.sources.nightlights
    assert (s1.url, s1.sign, s1.collection) == (PC_URL, "planetary_computer", "sentinel-1-rtc")
    assert cfg.sources.sentinel2.url is None and cfg.stac.url == ES_URL
    # A source with its own API is not touched by the stac preset.
    assert (nl.url, nl.collection, nl.assets, nl.rename) == (
        "http://lights/stac",
        "vnp46a2",
        ["data"],
        {},
    )


def test_plain_config_without_preset_is_unchanged():
    data = base(url="http://127.0.0.1:1/api")
    data["sources"]["sentinel2"] = {
        "collection": "c",
        "datetime": "2021",
        "assets": ["blue", "B04"],
        "mask_asset": "SCL",
    }
    s2 = config_from_dict(data).sources.sentinel2
    assert (s2.assets, s2.bands, s2.mask_asset, s2.rename) == (
        ["blue", "B04"],
        ["blue", "B04"],
        "SCL",
        {},
    )
    assert expand_presets(data) == data


def test_expansion_is_idempotent_and_pure():
    data = with_sources(
        base(preset="earth-search"), sentinel1={"preset": "planetary-computer", "datetime": "2021"}
    )
    before = json.dumps(data, sort_keys=True)
    once = expand_presets(data)
    assert json.dumps(data, sort_keys=True) == before
    assert expand_presets(once) == once


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            base(preset="usgs"),
            "run.yaml: stac.preset: unknown preset 'usgs'; "
            "known presets: earth-search, planetary-computer",
        ),
        (
            with_sources(base(preset="earth-search"), sentinel1={"datetime": "2021"}),
            "run.yaml: sources.sentinel1: the earth-search preset offers no sentinel1",
        ),
        (
            with_sources(
                base(preset="earth-search"), sentinel1={"preset": "landsat", "datetime": "2021"}
            ),
            "run.yaml: sources.sentinel1.preset: unknown preset 'landsat'",
        ),
        (
            {**base(preset="planetary-computer"), "sources": {"sentinel2": {"months": [6]}}},
            "run.yaml: sources.sentinel2.datetime: required: the dates to composite",
        ),
    ],
)
def test_preset_errors_are_one_clear_line(data, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, name="run.yaml")
    msg = str(err.value)
    assert msg.startswith(expected) and "\n" not in msg, msg


def test_earth_search_sentinel1_error_says_what_to_do():
    data = with_sources(base(preset="earth-search"), sentinel1={"datetime": "2021"})
    with pytest.raises(ConfigError, match=r"sources\.sentinel1\.preset: planetary-computer"):
        config_from_dict(data)


def test_subdataset_and_band_names_are_validated():
    with pytest.raises(ValueError, match="DRIVER:PATH"):
        SourceConfig(collection="c", datetime="2021", assets=["a"], subdataset="no-driver")
    with pytest.raises(ValueError, match=r"\['B02'\] occur twice"):
        SourceConfig(
            collection="c", datetime="2021", assets=["blue", "B02"], rename={"blue": "B02"}
        )


def test_every_preset_maps_onto_known_bands():
    for preset in PRESETS.values():
        s2 = preset.sources["sentinel2"]
        names = [s2.get("rename", {}).get(a, a) for a in s2["assets"]]
        assert names == list(S2_BANDS), preset.name
    assert set(EARTH_SEARCH_S2.values()) >= set(S2_BANDS) | {"SCL"}


# --------------------------------------------------------------------------------------
# Real catalog items: presets, filter, radiometry, dates, projection
# --------------------------------------------------------------------------------------
# Items the Planetary Computer and Earth Search really returned (../shared/data/realstac,
# see its manifest.json for where each was recorded). Skipped, with the reason, when the
# shared folder is not beside the repository.
needs_realstac = pytest.mark.skipif(
    not REALSTAC.is_dir(), reason=f"{REALSTAC} is absent (../shared beside the repository)"
)
PC_S2 = {  # file stem prefix → processing baseline
    "S2A_MSIL2A_20150704T101006_R022_T35XQA": "02.12",
    "S2A_MSIL2A_20190101T000001_R116_T60VUK": "02.12",
    "S2B_MSIL2A_20220612T182919_R027_T24XWR": "04.00",
    "S2A_MSIL2A_20230216T150721_R082_T19PHS": "04.00",
    "S2B_MSIL2A_20240825T173909_R098_T13TDE": "05.11",
}
ES_S2 = {"S2A_13TDE_20231008_0_L2A": "05.09", "S2B_25LBG_20240809_0_L2A": "05.11"}
PC_S1 = "S1A_IW_GRDH_1SDV_20240419T045904_20240419T045916_053498_067DF2_rtc"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"


def real(catalog: str, collection: str, stem: str) -> pystac.Item:
    """A recorded item, read as popdask reads items (``pystac.Item.from_dict``)."""
    (path,) = (REALSTAC / catalog / collection).glob(f"{stem}*.json")
    return pystac.Item.from_dict(json.loads(path.read_text()))


def pc_s2() -> list[pystac.Item]:
    return [real("planetary-computer", "sentinel-2-l2a", s) for s in PC_S2]


def es_s2() -> list[pystac.Item]:
    return [real("earth-search", "sentinel-2-l2a", s) for s in ES_S2]


def handwritten_es(case: str) -> pystac.Item:
    """A hand-written Earth Search item, for a case no recorded one covers (see the README
    of tests/data/stac): ``baseline-03.00`` (before the 2022 change: raster:bands offset 0)
    or ``flag-false`` (raw DNs of baseline 04.00, ``boa_offset_applied: false``)."""
    (path,) = (DATA / "earth-search").glob(f"handwritten-{case}_*.json")
    return pystac.Item.from_dict(json.loads(path.read_text()))


def preset_assets(preset: str, source: str = "sentinel2") -> list[str]:
    """The asset keys a run with ``preset`` reads for ``source`` (through the config)."""
    data = with_sources(base(preset=preset), **({source: {"datetime": "2021"}}))
    cfg = getattr(config_from_dict(data).sources, source)
    return [*cfg.assets, *([cfg.mask_asset] if cfg.mask_asset else [])]


@needs_realstac
@pytest.mark.parametrize(
    ("preset", "source", "items"),
    [
        ("planetary-computer", "sentinel2", pc_s2),
        (
            "planetary-computer",
            "sentinel1",
            lambda: [real("planetary-computer", "sentinel-1-rtc", PC_S1)],
        ),
        ("earth-search", "sentinel2", es_s2),
    ],
)
def test_presets_resolve_to_collections_and_cog_assets_of_real_items(preset, source, items):
    items = items()
    collection = PRESETS[preset].sources[source]["collection"]
    assert {it.collection_id for it in items} == {collection}
    keys = preset_assets(preset, source)
    kept, skipped = filter_items(items, assets=keys)
    assert kept == items and skipped == {}
    for it in items:
        for key in keys:  # every key chosen is the COG, over https, never a -jp2 twin
            asset = it.assets[key]
            assert asset.media_type == COG, (it.id, key)
            assert asset.href.startswith("https://"), (it.id, key)
            assert not key.endswith("-jp2")
    if preset == "earth-search":  # the twins are there, in a requester-pays bucket
        for it in items:
            for key in keys:
                twin = it.assets[f"{key}-jp2"]
                assert twin.href.startswith("s3://sentinel-s2-l2a/")
                assert twin.media_type == "image/jp2"


@needs_realstac
def test_real_items_of_one_catalog_lack_the_other_catalogs_keys():
    pc_keys, es_keys = preset_assets("planetary-computer"), preset_assets("earth-search")
    assert filter_items(es_s2(), assets=pc_keys)[1] == {"missing_asset": 2}
    assert filter_items(pc_s2(), assets=es_keys)[1] == {"missing_asset": 5}
    # what the skipped items have instead, in the message (never a -jp2 twin as a match)
    from popdask.sources import asset_drift, drift_message

    es = [it.to_dict(include_self_link=False, transform_hrefs=False) for it in es_s2()]
    drift = asset_drift(es, pc_keys)
    assert drift["similar"]["B04"] == ["red"] and drift["similar"]["SCL"] == ["scl"]
    msg = drift_message("sentinel2", "sentinel-2-l2a", drift, of=2)
    assert "2 of 2 items" in msg and "lack asset 'B01' (2), like 'coastal'" in msg
    assert "Earth Search's band names" in msg and "\n" not in msg
    assert asset_drift(es, es_keys) is None


@needs_realstac
def test_real_items_filter_on_months_and_cloud_cover():
    items = (
        pc_s2()
    )  # July 2015 (98 %), Jan 2019 (56 %), June 2022 (31 %), Feb 2023, Aug 2024 (49 %)
    kept, skipped = filter_items(items, months=[6, 7, 8, 9, 10], max_cloud_cover=40)
    assert [it.id[:25] for it in kept] == ["S2B_MSIL2A_20220612T18291"]
    assert skipped == {"month": 2, "cloud_cover": 2}


# DN each item stores for a surface of reflectance 0.05: ESA writes 10000 ρ, + 1000 from
# baseline 04.00 on; Earth Search subtracted that 1000 again where boa_offset_applied is true.
def _dn_for_005(item: pystac.Item) -> int:
    baseline = float(item.properties["s2:processing_baseline"])
    harmonised = item.properties.get("earthsearch:boa_offset_applied") is True
    return 1500 if baseline >= 4 and not harmonised else 500


@needs_realstac
@pytest.mark.parametrize("catalog", ["planetary-computer", "earth-search"])
def test_same_surface_same_reflectance_across_catalogs_and_baselines(catalog):
    if catalog == "planetary-computer":
        items = pc_s2()
        # PC: no raster:bands at all, the offset can only come from the baseline
        assert not any("raster:bands" in a.extra_fields for it in items for a in it.assets.values())
    else:
        # recorded items are all baseline ≥ 05 and harmonised; the hand-written two add the
        # other side of the 2022 change and an unharmonised item
        items = [*es_s2(), handwritten_es("baseline-03.00"), handwritten_es("flag-false")]
    assets = preset_assets(catalog)
    scale, offset = scale_offset(items, assets, name="sentinel2")
    dn = np.array([_dn_for_005(i) for i in items], np.float64)
    assert {500, 1500} <= set(dn)  # both sides of the baseline change are covered
    refl = dn[:, None] * scale[:, :-1] + offset[:, :-1]
    np.testing.assert_allclose(refl, 0.05, atol=1e-9)
    # The same through the compositing kernel, one item at a time (float32 as in production).
    for t in range(len(items)):
        stack = np.full((1, len(assets), 2, 2), dn[t], np.float32)
        stack[0, -1] = 4  # SCL vegetation: kept
        out = comp.optical_composite(
            stack,
            groups=np.zeros(1, np.int64),
            scale=scale[t : t + 1],
            offset=offset[t : t + 1],
            mask_band=len(assets) - 1,
        )
        np.testing.assert_allclose(out, 0.05, atol=1e-6)


@needs_realstac
def test_harmonised_earth_search_item_is_not_offset_twice():
    item = es_s2()[0]
    assert item.assets["red"].extra_fields["raster:bands"][0]["offset"] == -0.1
    assert item.properties["earthsearch:boa_offset_applied"] is True
    scale, offset = scale_offset([item], ["red"], name="sentinel2")
    assert (scale[0, 0], offset[0, 0]) == (0.0001, 0.0)
    raw = handwritten_es("flag-false")
    assert scale_offset([raw], ["red"], name="sentinel2")[1][0, 0] == -0.1


@needs_realstac
def test_sentinel1_scale_is_one():
    s1 = real("planetary-computer", "sentinel-1-rtc", PC_S1)
    scale, offset = scale_offset([s1], ["vv", "vh"], name="sentinel1")
    assert (scale == 1).all() and (offset == 0).all()


def _frames_without_datetime(s1: pystac.Item) -> list[dict]:
    """Two frames of the recorded S1 RTC pass given by their range only (``datetime``
    null, which STAC allows) in its space-separated form, a frame of the next day whose
    ``datetime`` is RFC 3339, and a frame of the same pass given in local time (+02:00)
    that is the earliest in UTC."""
    d = s1.to_dict(include_self_link=False, transform_hrefs=False)
    start = d["properties"]["start_datetime"]
    assert start == "2024-04-19 04:59:04.220006+00:00"  # the quirk, as recorded
    frames = []
    for iid, props in [
        ("f1", {"datetime": None}),
        ("f2", {"datetime": None, "start_datetime": "2024-04-19 04:59:29.220006+00:00"}),
        ("next", {"datetime": "2024-04-20T04:50:00Z", "start_datetime": None}),
        ("local", {"datetime": None, "start_datetime": "2024-04-19 06:59:00+02:00"}),
    ]:
        frames.append({**d, "id": iid, "properties": {**d["properties"], **props}})
    return frames


@needs_realstac
def test_space_separated_s1_dates_parse_wherever_dates_are_read():
    from popdask.catalog import choose_items
    from popdask.sources import item_time

    s1 = real("planetary-computer", "sentinel-1-rtc", PC_S1)
    assert item_time(s1.properties).isoformat() == "2024-04-19T04:59:10.436706+00:00"
    frames = _frames_without_datetime(s1)
    items = [pystac.Item.from_dict(f) for f in frames]
    assert [item_time(f["properties"]).isoformat() for f in frames] == [
        "2024-04-19T04:59:04.220006+00:00",
        "2024-04-19T04:59:29.220006+00:00",
        "2024-04-20T04:50:00+00:00",
        "2024-04-19T04:59:00+00:00",
    ]
    # months
    assert len(filter_items(items, months=[4])[0]) == 4
    assert filter_items(items, months=[5])[1] == {"month": 4}
    # acquisition days: the frames of one pass are one day
    assert day_groups(items).tolist() == [0, 0, 1, 0]
    # the choice per footprint (per day) and its date order: by time, not by string
    choice = choose_items(frames, 2)
    assert choice.groups == {"orbit 51 descending": {"usable": 4, "kept": 4}}
    assert [d["id"] for d in choice.items] == ["local", "f1", "f2", "next"]


def test_day_groups_join_granules_of_one_date():
    a = pystac.Item("a", None, None, pystac.utils.str_to_datetime("2022-07-20T10:36:29Z"), {})
    b = pystac.Item("b", None, None, pystac.utils.str_to_datetime("2022-07-20T10:36:32Z"), {})
    c = pystac.Item("c", None, None, pystac.utils.str_to_datetime("2022-07-25T10:30:00Z"), {})
    assert day_groups([a, b, c]).tolist() == [0, 0, 1]


@needs_realstac
@pytest.mark.parametrize(
    ("item", "key"),
    [
        (lambda: pc_s2()[-1], "B04"),
        (lambda: es_s2()[0], "red"),
        (lambda: real("planetary-computer", "sentinel-1-rtc", PC_S1), "vv"),
    ],
)
def test_plain_items_restore_proj_epsg_for_stackstac(item, key):
    """Real items carry ``proj:epsg`` and no ``proj:code``; pystac turns the one into the
    other; without ``proj:epsg`` stackstac places the asset by the item's lon/lat bbox."""
    from stackstac.prepare import prepare_items

    it = item()
    raw = it.to_dict(include_self_link=False, transform_hrefs=False)
    epsg = int(it.properties["proj:code"].split(":")[1])
    assert "proj:epsg" not in it.properties  # what popdask must cope with
    (d,) = plain_items([it], [key])
    assert d["properties"]["proj:epsg"] == epsg and "proj:epsg" not in it.properties
    assert d["assets"][key]["href"] == it.assets[key].href
    shape = d["assets"][key].get("proj:shape") or d["properties"]["proj:shape"]
    transform = d["assets"][key].get("proj:transform") or d["properties"]["proj:transform"]
    a = Affine(*transform[:6])
    expected = [a.c, a.f + a.e * shape[0], a.c + a.a * shape[1], a.f]
    table, *_ = prepare_items([d], assets=[key], epsg=epsg, resolution=20)
    np.testing.assert_allclose(table["bounds"][0, 0].tolist(), expected)
    wrong, *_ = prepare_items([raw], assets=[key], epsg=epsg, resolution=20)
    assert not np.allclose(wrong["bounds"][0, 0].tolist(), expected)
    (sub,) = plain_items([it], [key], subdataset="NETCDF:var")
    assert sub["assets"][key]["href"] == f'NETCDF:"/vsicurl/{it.assets[key].href}":var'


# --------------------------------------------------------------------------------------
# Night lights: GDAL subdataset paths
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("href", "subdataset", "expected"),
    [
        (
            "https://ladsweb.example/VNP46A2.A2021001.h18v04.001.h5",
            "HDF5://HDFEOS/GRIDS/VNP_Grid_DNB/Data_Fields/DNB_BRDF-Corrected_NTL",
            'HDF5:"/vsicurl/https://ladsweb.example/VNP46A2.A2021001.h18v04.001.h5"'
            "://HDFEOS/GRIDS/VNP_Grid_DNB/Data_Fields/DNB_BRDF-Corrected_NTL",
        ),
        ("s3://bucket/v.nc", "NETCDF:avg_rad", 'NETCDF:"/vsis3/bucket/v.nc":avg_rad'),
        ("/data/v.nc", "NETCDF:avg_rad", 'NETCDF:"/data/v.nc":avg_rad'),
        (
            "file:///data/m.hdf",
            'HDF4_EOS:EOS_GRID:"{href}":grid:NTL',
            'HDF4_EOS:EOS_GRID:"/data/m.hdf":grid:NTL',
        ),
    ],
)
def test_subdataset_href(href, subdataset, expected):
    assert subdataset_href(href, subdataset) == expected


def test_subdataset_is_read_through_stackstac(tmp_path, monkeypatch):
    """A netCDF variable read as a GDAL subdataset lands on the grid like a COG."""
    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.001)
    from rasterio.shutil import copy as rio_copy

    tif, path = tmp_path / "lights.tif", tmp_path / "lights.nc"
    data = np.arange(50 * 50, dtype=np.float32).reshape(50, 50) + 1
    transform = Affine(20, 0, 4321000, 0, -20, 3211000)
    with rasterio.open(
        tif,
        "w",
        driver="GTiff",
        width=50,
        height=50,
        count=1,
        dtype="float32",
        crs="EPSG:3035",
        transform=transform,
    ) as dst:
        dst.write(data, 1)
    rio_copy(tif, path, driver="netCDF")  # one variable, named Band1 by GDAL
    item = _item(
        "lights", "2021-01-01T00:00:00Z", str(path), "EPSG:3035", transform, (50, 50), "rad"
    )
    stack = load_stack(
        [item],
        ["rad"],
        bounds=(4321000, 3210000, 4322000, 3211000),
        resolution=20,
        subdataset="NETCDF:Band1",
    )
    np.testing.assert_array_equal(stack.values[0, 0], data)
    bad = load_stack(
        [item],
        ["rad"],
        bounds=(4321000, 3210000, 4322000, 3211000),
        resolution=20,
        subdataset="NETCDF:no_such_variable",
    )
    with pytest.raises(RuntimeError, match="no_such_variable"):
        bad.values  # noqa: B018


# --------------------------------------------------------------------------------------
# Signing at read time
# --------------------------------------------------------------------------------------
def _item(iid, dt, href, code, transform, shape, key="B04") -> pystac.Item:
    epsg = int(code.split(":")[1])
    h, w = shape
    corners = transform * (0, 0), transform * (w, h)
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    t = Transformer.from_crs(epsg, 4326, always_xy=True)
    west, south, east, north = t.transform_bounds(
        min(xs), min(ys), max(xs), max(ys), densify_pts=21
    )
    geom = {
        "type": "Polygon",
        "coordinates": [
            [[west, south], [east, south], [east, north], [west, north], [west, south]]
        ],
    }
    item = pystac.Item(
        iid, geom, [west, south, east, north], pystac.utils.str_to_datetime(dt), {"proj:code": code}
    )
    item.add_asset(
        key,
        pystac.Asset(
            href,
            extra_fields={
                "proj:code": code,
                "proj:shape": [h, w],
                "proj:transform": list(transform)[:6],
            },
        ),
    )
    return item


@pytest.fixture
def cog(tmp_path):
    path = tmp_path / "vv.tif"
    data = np.full((50, 50), 0.25, np.float32)
    data[10:20, 10:20] = 0.5
    transform = Affine(20, 0, 4321000, 0, -20, 3211000)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=50,
        height=50,
        count=1,
        dtype="float32",
        crs="EPSG:3035",
        transform=transform,
        nodata=np.nan,
    ) as dst:
        dst.write(data, 1)
    href = "https://sentinel1euwestrtc.blob.core.windows.net/sentinel1-grd-rtc/GRD/vv.tif"
    return (
        path,
        data,
        _item("s1", "2021-07-05T05:23:55Z", href, "EPSG:3035", transform, (50, 50), "vv"),
    )


BOUNDS = (4321000, 3210000, 4322000, 3211000)
SIGNED: list[str] = []


class RecordingReader(SigningReader):
    """Signs by recording the href and answering with a local path (test injection point)."""

    target = ""

    @staticmethod
    def sign_href(href: str) -> str:
        SIGNED.append(href)
        return RecordingReader.target


def test_signing_reader_signs_at_read_time_not_at_graph_build(cog, monkeypatch):
    path, data, item = cog
    SIGNED.clear()
    monkeypatch.setattr(RecordingReader, "target", str(path))
    stack = load_stack([item], ["vv"], bounds=BOUNDS, resolution=20, reader=RecordingReader)
    assert SIGNED == []  # the graph holds unsigned hrefs
    values = stack.values
    assert SIGNED and set(SIGNED) == {item.assets["vv"].href}
    np.testing.assert_array_equal(values[0, 0], data)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # planetary_computer's pydantic v1 style
def test_tile_composite_signs_planetary_computer_hrefs_inside_tasks(cog, monkeypatch):
    import planetary_computer

    path, data, item = cog
    calls: list[str] = []

    def fake_sign(href: str) -> str:
        calls.append(href)
        return str(path)

    monkeypatch.setattr(planetary_computer, "sign", fake_sign)
    cfg = SourceConfig(collection="sentinel-1-rtc", datetime="2021", assets=["vv"])
    src = SourceItems("sentinel1", cfg, [item], item_bounds_3035([item]))
    out, bands, _, n = tile_composite([src], BOUNDS, resolution=20, sign="planetary_computer")
    assert calls == [] and bands == ["vv"] and n == {"sentinel1": 1}
    db = out.compute()
    assert calls == [item.assets["vv"].href]
    np.testing.assert_allclose(db[0], 10 * np.log10(data), rtol=1e-6)


def test_signed_token_never_reaches_messages_or_logs(tmp_path, cog, monkeypatch, caplog):
    _, _, item = cog
    monkeypatch.setattr(reader_mod, "BACKOFF_S", 0.001)
    monkeypatch.setattr(RecordingReader, "target", f"{tmp_path}/gone.tif?st=2026&sig=SECRETTOKEN")
    stack = load_stack([item], ["vv"], bounds=BOUNDS, resolution=20, reader=RecordingReader)
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError) as err:
        stack.values  # noqa: B018
    assert "SECRETTOKEN" not in str(err.value) and "SECRETTOKEN" not in caplog.text
    assert "sentinel1euwestrtc.blob.core.windows.net" in str(err.value)  # still says what failed
    assert "retry 1" in caplog.text


def test_redact_and_sign_embedded():
    url = "https://acct.blob.core.windows.net/c/x.tif"
    assert redact(f"Error opening '{url}?st=1&se=2&sig=abc%2F': no") == f"Error opening '{url}': no"
    sub = f'HDF5:"/vsicurl/{url}"://g/f'
    assert sign_embedded(sub, lambda u: u + "?tok") == f'HDF5:"/vsicurl/{url}?tok"://g/f'
    assert sign_embedded("/local/x.tif", lambda u: u + "?tok") == "/local/x.tif"


def test_reader_for():
    assert reader_for(None) is ClosingReader
    assert reader_for("planetary_computer") is PlanetaryComputerReader
    with pytest.raises(ValueError, match="unknown signing method 'sas'"):
        reader_for("sas")


# --------------------------------------------------------------------------------------
# Two UTM zones, one date, one tile: no seam
# --------------------------------------------------------------------------------------
def _ramp_granule(path: Path, epsg: int, tile: tuple, keep) -> tuple[Affine, tuple[int, int]]:
    """A 20 m granule in ``epsg`` over ``tile`` (EPSG:3035) holding the 3035-x ramp."""
    to_utm = Transformer.from_crs(3035, epsg, always_xy=True)
    x0, y0, x1, y1 = to_utm.transform_bounds(*tile, densify_pts=21)
    x0, y0 = math.floor(x0 / 20) * 20 - 200, math.floor(y0 / 20) * 20 - 200
    w, h = math.ceil((x1 - x0) / 20) + 20, math.ceil((y1 - y0) / 20) + 20
    transform = Affine(20, 0, x0, 0, -20, y0 + 20 * h)
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = transform * (cols, rows)
    x3035, _ = Transformer.from_crs(epsg, 3035, always_xy=True).transform(xs, ys)
    lon, _ = Transformer.from_crs(epsg, 4326, always_xy=True).transform(xs, ys)
    ramp = ((x3035 - tile[0]) / 20).astype(np.float32)
    ramp[~keep(lon)] = np.nan  # the granule's own side of the zone boundary
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=1,
        dtype="float32",
        crs=f"EPSG:{epsg}",
        transform=transform,
        nodata=np.nan,
        tiled=True,
        blockxsize=64,
        blockysize=64,
    ) as dst:
        dst.write(ramp, 1)
    return transform, (h, w)


def test_granules_in_two_utm_zones_mosaic_without_a_seam(tmp_path):
    x, y = Transformer.from_crs(4326, 3035, always_xy=True).transform(12.0, 48.0)
    x0, y0 = round(x / 20) * 20 - 1000, round(y / 20) * 20 - 1000
    tile = (x0, y0, x0 + 2000, y0 + 2000)  # 100 × 100 px across 12°E
    margin = 0.001  # ≈ 75 m of overlap, as granules of neighbouring zones have
    items = []
    for epsg, keep, t in [
        (32632, lambda lon: lon <= 12 + margin, "10:36:29"),
        (32633, lambda lon: lon >= 12 - margin, "10:36:32"),
    ]:
        path = tmp_path / f"{epsg}.tif"
        transform, shape = _ramp_granule(path, epsg, tile, keep)
        items.append(
            _item(f"T{epsg}", f"2022-07-20T{t}Z", str(path), f"EPSG:{epsg}", transform, shape)
        )
    cube = load_stack(items, ["B04"], bounds=tile, resolution=20)
    assert (cube.x.values[0], cube.y.values[0]) == (tile[0] + 10, tile[3] - 10)  # pixel centres
    stack = cube.values
    # Each granule covers only its side of the tile: the seam is inside it.
    for t in range(2):
        assert 0.2 < np.isnan(stack[t, 0]).mean() < 0.8
    out = comp.median_composite(stack, groups=day_groups(items))[0]
    assert not np.isnan(out).any()
    expected = np.broadcast_to(np.arange(100) + 0.5, (100, 100))
    err = np.abs(out - expected)
    assert err.max() <= 1.0, err.max()  # nearest resampling: within a pixel everywhere
    seam = np.isnan(stack[0, 0]) != np.isnan(stack[1, 0])
    assert err[seam].max() <= 1.0
