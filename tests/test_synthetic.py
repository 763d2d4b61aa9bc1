"""Tests of the synthetic demo region (popdask.synthetic).

One small region (4 × 4 km, few dates) is generated once per module; two more runs check
determinism and the href rewriting. Every test asserts a property the pipeline relies on.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio

from popdask import synthetic
from popdask.synthetic import (
    CENSUS_2021_VARIABLES,
    LANDCOVER_CLASSES,
    S2_BANDS,
    DemoRegion,
    census_table,
    make_demo_region,
    make_landscape,
    rewrite_hrefs,
    s1_backscatter,
    s2_to_dn,
)

BBOX = (4321000, 3210000, 4325000, 3214000)
ARGS = {"bbox": BBOX, "n_s2_dates": 4, "n_s1_dates": 2, "n_viirs_dates": 1}
BASE = "http://127.0.0.1:8080/demo/"
CLASS = {v: k for k, v in LANDCOVER_CLASSES.items()}


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> DemoRegion:
    return make_demo_region(tmp_path_factory.mktemp("demo_a"), seed=0, **ARGS)


@pytest.fixture(scope="module")
def region_served(tmp_path_factory) -> DemoRegion:
    """Same seed and arguments as `region`, but hrefs under an HTTP base."""
    return make_demo_region(tmp_path_factory.mktemp("demo_b"), seed=0, href_base=BASE, **ARGS)


@pytest.fixture(scope="module")
def region_other_seed(tmp_path_factory) -> DemoRegion:
    return make_demo_region(tmp_path_factory.mktemp("demo_c"), seed=1, **ARGS)


def read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read(href: str) -> tuple[np.ndarray, rasterio.profiles.Profile]:
    with rasterio.open(href) as src:
        return src.read(1), src.profile


def s2_by_date(region: DemoRegion) -> dict[str, list[dict]]:
    dates = defaultdict(list)
    for item in read_items(region.items["sentinel-2-l2a"]):
        dates[item["properties"]["datetime"]].append(item)
    return dict(sorted(dates.items()))


# ---- files, grids, truth and census ---------------------------------------------------------
def test_all_files_written(region):
    assert region.bbox == BBOX
    assert set(region.collections) == {"sentinel-2-l2a", "sentinel-1-rtc", "viirs-nightlights"}
    assert set(region.items) == set(region.collections)
    for path in [*region.collections.values(), *region.items.values()]:
        assert path.is_file() and path.stat().st_size > 0
    for path in (region.census, region.truth, region.landcover):
        assert path.is_file() and path.parent == region.root
    n_items = {cid: len(read_items(p)) for cid, p in region.items.items()}
    # three granules per Sentinel-2 date, two frames per Sentinel-1 date, one VIIRS granule
    assert n_items == {"sentinel-2-l2a": 4 * 3, "sentinel-1-rtc": 2 * 2, "viirs-nightlights": 1}


def test_truth_and_landcover_cover_the_bbox_on_the_3035_grid(region):
    for path, dtype in ((region.truth, "float32"), (region.landcover, "uint8")):
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == 3035
            assert src.res == (20.0, 20.0)
            assert tuple(src.bounds) == BBOX
            assert src.shape == (200, 200)
            assert src.dtypes[0] == dtype
    truth, _ = read(region.truth)
    landcover, _ = read(region.landcover)
    assert np.all(truth >= 0) and np.isfinite(truth).all()
    assert set(np.unique(landcover)) <= set(LANDCOVER_CLASSES)
    assert 1000 < truth.sum() < 100_000  # a small town and a village on 16 km²


def test_census_cells_are_gisco_cells_summing_the_truth(region):
    truth, _ = read(region.truth)
    census = pd.read_csv(region.census, dtype={"GRD_ID": str})
    assert list(census.columns) == [
        "GRD_ID",
        "TOT_P_2021",
        *CENSUS_2021_VARIABLES,
        "CONFIDENTIALSTATUS",
    ]
    assert census.notna().all().all()  # nothing written empty: confidential rows are flagged
    listed = {}
    for grd_id, count, flag in census[["GRD_ID", "TOT_P_2021", "CONFIDENTIALSTATUS"]].itertuples(
        index=False
    ):
        m = re.fullmatch(r"CRS3035RES1000mN(\d+)E(\d+)", grd_id)
        assert m, grd_id
        listed[int(m[2]), int(m[1])] = (count, flag)
    populated = set()
    for x in range(BBOX[0], BBOX[2], 1000):
        for y in range(BBOX[1], BBOX[3], 1000):
            row, col = (BBOX[3] - y - 1000) // 20, (x - BBOX[0]) // 20
            cell_sum = truth[row : row + 50, col : col + 50].astype(np.float64).sum()
            if (x, y) in listed:
                count, _ = listed[x, y]
                assert count >= 1 and abs(count - cell_sum) <= 0.5 + 1e-6
            else:  # Eurostat lists populated cells only: an absent cell has nobody in it
                assert round(cell_sum) == 0
            if round(cell_sum) >= 1:
                populated.add((x, y))
    assert set(listed) == populated
    # confidential cells are flagged (their count is not to be used), never written empty
    flags = census.CONFIDENTIALSTATUS
    assert set(flags.unique()) <= {0, 1} and flags.sum() >= 1


def test_census_table_lists_populated_cells_only():
    pop = np.zeros((150, 150), np.float32)  # 3 x 3 cells of 20 m pixels
    pop[:50, :50] = 0.01  # 25 persons in the north-west cell
    pop[100:, 100:] = 0.0001  # 0.25 persons in the south-east cell: rounds to 0, not listed
    pop[50:100, 50:100] = 1.0  # 2500 persons in the middle
    t = census_table(pop, (0, 0, 3000, 3000), rng=np.random.default_rng(0))
    assert t.GRD_ID.tolist() == ["CRS3035RES1000mN2000E0", "CRS3035RES1000mN1000E1000"]
    assert t.TOT_P_2021.tolist() == [25, 2500] and (t.TOT_P_2021 > 0).all()
    assert t.CONFIDENTIALSTATUS.tolist() == [0, 0]  # fewer than 10 populated cells
    pop = np.ones((500, 500), np.float32)  # 100 populated cells: 2 flagged (1.5 %, rounded)
    t = census_table(pop, (0, 0, 10000, 10000), rng=np.random.default_rng(0))
    assert len(t) == 100 and t.CONFIDENTIALSTATUS.sum() == 2


def test_the_demo_census_reads_as_zero_known_and_unknown(region):
    from popdask.census import read_census
    from popdask.grid import Grid

    truth, _ = read(region.truth)
    cells = truth.astype(np.float64).reshape(4, 50, 4, 50).sum(axis=(1, 3))
    da = read_census(region.census, Grid.from_bbox(BBOX))
    flagged = pd.read_csv(region.census).CONFIDENTIALSTATUS.to_numpy() == 1
    assert np.isnan(da.values).sum() == flagged.sum() == da.attrs["cells_unknown"]
    known = np.isfinite(da.values)
    assert np.all(np.abs(da.values[known] - cells[known]) <= 0.5 + 1e-6)
    assert da.attrs["cells_absent_zero"] == int((np.rint(cells) == 0).sum())


def test_population_is_not_a_function_of_land_cover(region):
    truth, _ = read(region.truth)
    landcover, _ = read(region.landcover)
    for name, min_cv in (("suburb", 0.3), ("old_core", 0.2), ("apartment_blocks", 0.2)):
        pop = truth[landcover == CLASS[name]]
        assert pop.size > 50, f"{name} missing from the test region"
        assert pop.std() / pop.mean() > min_cv, name
    # a class-mean model explains only part of the pixel variance
    means = np.zeros(256)
    for k in np.unique(landcover):
        means[k] = truth[landcover == k].mean()
    residual = truth - means[landcover]
    assert 1 - residual.var() / truth.var() < 0.8
    # plausible magnitudes: persons per 20 m pixel, dense cores >> suburbs, empty industry
    density = {n: truth[landcover == CLASS[n]].mean() * 2500 for n in CLASS}  # persons/km²
    assert 8000 < density["old_core"] < 40000
    assert 1000 < density["suburb"] < 6000
    assert density["industry"] < 0.05 * density["suburb"]
    assert density["cereal"] < 50 and density["water"] < density["suburb"]
    assert truth.max() < 80


# ---- STAC ---------------------------------------------------------------------------------
REQUIRED_PROPS = (
    "datetime",
    "platform",
    "proj:code",
    "proj:epsg",
    "proj:shape",
    "proj:transform",
    "proj:bbox",
)
ASSETS = {
    "sentinel-2-l2a": {*S2_BANDS, "SCL"},
    "sentinel-1-rtc": {"vv", "vh"},
    "viirs-nightlights": {"avg_rad"},
}


def test_collections_and_items_are_valid_stac(region):
    for cid, path in region.collections.items():
        collection = pystac.Collection.from_dict(json.loads(path.read_text()))
        assert collection.id == cid
        assert collection.license
    ids = set()
    for cid, path in region.items.items():
        for d in read_items(path):
            item = pystac.Item.from_dict(d)
            assert item.collection_id == cid
            assert item.id not in ids
            ids.add(item.id)
            props = d["properties"]
            for key in REQUIRED_PROPS:
                assert key in props, (item.id, key)
            assert props["datetime"].endswith("Z")
            assert props["proj:code"] == f"EPSG:{props['proj:epsg']}"
            assert any("projection" in e for e in d["stac_extensions"])
            assert any("raster" in e for e in d["stac_extensions"])
            assert set(d["assets"]) == ASSETS[cid]
            for asset in d["assets"].values():
                assert asset["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
                assert asset["roles"] == ["data"]
                (band,) = asset["raster:bands"]
                assert {"nodata", "data_type"} <= set(band)
                assert "scale" not in band and "offset" not in band
            lon0, lat0, lon1, lat1 = d["bbox"]
            assert 9.9 < lon0 < lon1 < 10.2 and 51.9 < lat0 < lat1 < 52.1
            if cid == "sentinel-2-l2a":
                assert any("eo" in e for e in d["stac_extensions"])
                assert 0 <= props["eo:cloud_cover"] <= 100
                assert props["s2:processing_baseline"] == (
                    "03.01" if props["datetime"].startswith("2021") else "04.00"
                )
                assert re.fullmatch(r"S2[AB]_MSIL2A_\d{8}_T32UNC_g[123]", item.id)
                assert all(
                    a["raster:bands"][0]["spatial_resolution"] == 20 for a in d["assets"].values()
                )
                assert d["assets"]["B04"]["raster:bands"][0] == {
                    "nodata": 0,
                    "data_type": "uint16",
                    "spatial_resolution": 20.0,
                }
    assert any(i.startswith("VIIRS_DNB_2021") for i in ids)


def test_item_projection_matches_its_cogs(region):
    for path in region.items.values():
        for d in read_items(path)[:3]:
            props = d["properties"]
            for asset in d["assets"].values():
                with rasterio.open(asset["href"]) as src:
                    assert src.crs.to_epsg() == props["proj:epsg"]
                    assert list(src.shape) == props["proj:shape"]
                    assert list(src.transform)[:6] == pytest.approx(props["proj:transform"])
                    assert list(src.bounds) == pytest.approx(props["proj:bbox"])
                    assert src.nodata == asset["raster:bands"][0]["nodata"]
                    assert src.dtypes[0] == asset["raster:bands"][0]["data_type"]
    expected_epsg = {"sentinel-2-l2a": 32632, "sentinel-1-rtc": 32632, "viirs-nightlights": 4326}
    for cid, epsg in expected_epsg.items():
        assert {d["properties"]["proj:epsg"] for d in read_items(region.items[cid])} == {epsg}


def test_assets_are_cloud_optimized_geotiffs(region):
    hrefs = [str(region.truth), str(region.landcover)]
    for cid in ("sentinel-2-l2a", "sentinel-1-rtc"):
        d = read_items(region.items[cid])[0]
        hrefs += [a["href"] for a in d["assets"].values()]
    for href in hrefs:
        with rasterio.open(href) as src:
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", href
            assert src.compression == rasterio.enums.Compression.deflate
            block = src.block_shapes[0]
            assert block[0] == block[1] and block[0] in (128, 256, 512)
            assert src.overviews(1), f"no overviews in {href}"
    viirs = read_items(region.items["viirs-nightlights"])[0]["assets"]["avg_rad"]["href"]
    with rasterio.open(viirs) as src:
        assert src.compression == rasterio.enums.Compression.deflate
        assert src.res == pytest.approx((1 / 240, 1 / 240))
        assert src.nodata == -32768.0


def test_granules_of_a_date_overlap_with_identical_values(region):
    for items in s2_by_date(region).values():
        assert len(items) == 3
        shared = 0
        for a, b in ((0, 1), (0, 2), (1, 2)):
            ta = items[a]["properties"]["proj:transform"]
            tb = items[b]["properties"]["proj:transform"]
            arr_a, _ = read(items[a]["assets"]["B08"]["href"])
            arr_b, _ = read(items[b]["assets"]["B08"]["href"])
            # both grids have 20 m pixels on multiples of 20 m: align them by offsets
            dc, dr = round((tb[2] - ta[2]) / 20), round((ta[5] - tb[5]) / 20)
            r0, c0 = max(0, dr), max(0, dc)
            r1, c1 = (
                min(arr_a.shape[0], dr + arr_b.shape[0]),
                min(arr_a.shape[1], dc + arr_b.shape[1]),
            )
            if r1 <= r0 or c1 <= c0:
                continue
            win_a = arr_a[r0:r1, c0:c1]
            win_b = arr_b[r0 - dr : r1 - dr, c0 - dc : c1 - dc]
            both = (win_a > 0) & (win_b > 0)
            np.testing.assert_array_equal(win_a[both], win_b[both])
            shared += both.sum()
        assert shared > 500  # the granules really overlap, with data on both sides


# ---- clouds and the processing baseline ----------------------------------------------------
def band(item: dict, name: str) -> np.ndarray:
    arr, _ = read(item["assets"][name]["href"])
    offset = 1000 if item["properties"]["s2:processing_baseline"] >= "04.00" else 0
    return (arr.astype(np.float64) - offset) / 10000


def test_cloudy_dates_are_flagged_and_corrupted(region):
    dates = s2_by_date(region)
    cover = {d: [i["properties"]["eo:cloud_cover"] for i in items] for d, items in dates.items()}
    cloudy = [d for d, c in cover.items() if min(c) >= 30]
    clear = [d for d, c in cover.items() if max(c) <= 15]
    assert len(cloudy) >= 1 and len(clear) >= 1, cover
    assert len(cloudy) + len(clear) == len(dates)
    shadow_checked = 0
    for d in cloudy:
        for item in dates[d]:
            scl, _ = read(item["assets"]["SCL"]["href"])
            valid = scl > 0
            flagged = np.isin(scl[valid], (8, 9, 10)).mean() * 100
            assert flagged == pytest.approx(item["properties"]["eo:cloud_cover"], abs=0.01)
            cloud = scl == 9
            blue, red, nir, swir = (band(item, b) for b in ("B02", "B04", "B8A", "B12"))
            assert np.median(blue[cloud]) > 0.3  # bright ...
            assert np.median(nir[cloud] / blue[cloud]) == pytest.approx(1.0, abs=0.2)  # ... flat
            # the same pixels on a clear date of the same granule are dark vegetation/soil
            twin = next(i for i in dates[clear[0]] if i["id"][-2:] == item["id"][-2:])
            twin_scl, _ = read(twin["assets"]["SCL"]["href"])
            clear_veg = twin_scl == 4
            assert np.median(band(twin, "B02")[clear_veg]) < 0.08
            assert np.median(band(twin, "B8A")[clear_veg] / band(twin, "B04")[clear_veg]) > 3
            # shadows darken what is under them
            shade = (scl == 3) & np.isin(twin_scl, (4, 5))
            if shade.sum() >= 50:
                ratio = np.median(nir[shade] / band(twin, "B8A")[shade])
                assert ratio < 0.75
                shadow_checked += 1
            assert np.median(swir[cloud]) < np.median(blue[cloud])
            assert red[cloud].min() > 0.1
    assert shadow_checked >= 1


def test_processing_baseline_adds_1000_from_2022(region):
    assert s2_to_dn(np.array([0.05, -0.02, 0.0]), "03.01").tolist() == [500, 1, 1]
    assert s2_to_dn(np.array([0.05, -0.02, 0.0]), "04.00").tolist() == [1500, 800, 1000]
    dates = s2_by_date(region)
    clear = {
        d[:4]: items
        for d, items in dates.items()
        if max(i["properties"]["eo:cloud_cover"] for i in items) <= 15
    }
    assert set(clear) == {"2021", "2022"}
    medians = {}
    for year, items in clear.items():
        dn = np.concatenate([read(i["assets"]["B8A"]["href"])[0].ravel() for i in items])
        scl = np.concatenate([read(i["assets"]["SCL"]["href"])[0].ravel() for i in items])
        assert (scl == 6).sum() > 100  # open water: a stable, dark target
        medians[year] = np.median(dn[scl == 6])
    assert medians["2021"] < 800
    assert medians["2022"] - medians["2021"] == pytest.approx(1000, abs=150)


# ---- radar and night lights ----------------------------------------------------------------
def test_radar_backscatter_rises_with_buildings_and_is_low_on_water():
    land = make_landscape((250, 250), rng=np.random.default_rng(3))
    vv, vh = s1_backscatter(land, doy=200, rng=np.random.default_rng(4))
    lc = land.landcover
    med = {n: np.median(vv[lc == CLASS[n]]) for n in ("old_core", "suburb", "cereal")}
    med["water"] = np.median(vv[land.fractions[synthetic._WATER] > 0.95])  # open water only
    assert med["old_core"] > 2 * med["suburb"] > 2 * med["water"]
    assert med["cereal"] > 3 * med["water"]
    assert np.median(vh) < np.median(vv) and vv.dtype == vh.dtype == np.float32
    # speckle: neighbouring field pixels differ a lot
    field = vv[lc == CLASS["cereal"]]
    assert field.std() / field.mean() > 0.3


def test_s1_and_viirs_files(region):
    items = read_items(region.items["sentinel-1-rtc"])
    for item in items:
        vv, profile = read(item["assets"]["vv"]["href"])
        assert profile["nodata"] == -32768.0 and vv.dtype == np.float32
        valid = vv != -32768.0
        assert valid.mean() > 0.5 and np.all(vv[valid] > 0)
    (viirs,) = read_items(region.items["viirs-nightlights"])
    rad, profile = read(viirs["assets"]["avg_rad"]["href"])
    assert profile["crs"].to_epsg() == 4326
    # the town glows (tens of nW/cm²/sr), the countryside is near zero
    assert rad.max() > 15 and np.percentile(rad, 10) < 3


# ---- determinism and hrefs -----------------------------------------------------------------
def test_same_seed_same_region_and_rewrite_matches_href_base(region, region_served, tmp_path):
    truth_a, _ = read(region.truth)
    truth_b, _ = read(region_served.truth)
    np.testing.assert_array_equal(truth_a, truth_b)
    assert region.census.read_text() == region_served.census.read_text()
    for cid, path in region.items.items():
        served = region_served.items[cid].read_text()
        rewritten = rewrite_hrefs(path, BASE, tmp_path / f"{cid}.ndjson").read_text()
        assert rewritten == served  # identical items, hrefs moved to the base
        for item in read_items(region_served.items[cid]):
            for asset in item["assets"].values():
                assert asset["href"].startswith(BASE)
                assert (region_served.root / asset["href"][len(BASE) :]).is_file()
        # and back to local absolute paths
        back = rewrite_hrefs(
            region_served.items[cid],
            None,
            tmp_path / "back.ndjson",
            old_base=BASE,
            root=region.root,
        )
        assert back.read_text() == path.read_text()
    first = read_items(region.items["sentinel-2-l2a"])[0]["assets"]["B02"]["href"]
    assert Path(first).is_absolute() and Path(first).is_file()
    arr_a, _ = read(first)
    arr_b, _ = read(str(region_served.root / Path(first).relative_to(region.root)))
    np.testing.assert_array_equal(arr_a, arr_b)


def test_other_seed_other_region(region, region_other_seed):
    truth_a, _ = read(region.truth)
    truth_c, _ = read(region_other_seed.truth)
    assert not np.array_equal(truth_a, truth_c)
    a = read_items(region.items["sentinel-2-l2a"])
    c = read_items(region_other_seed.items["sentinel-2-l2a"])
    assert [i["properties"] for i in a] != [i["properties"] for i in c]


def test_rewrite_refuses_foreign_hrefs(region, tmp_path):
    with pytest.raises(ValueError, match="old_base"):
        rewrite_hrefs(region.items["viirs-nightlights"], BASE, tmp_path / "x", old_base="s3://x/")


# ---- argument checks -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bbox": (4321500, 3210000, 4325000, 3214000)}, "multiple of 1000"),
        ({"bbox": (4321000, 3210000, 4322000, 3214000)}, "at least 2000"),
        ({"bbox": (4325000, 3210000, 4321000, 3214000)}, "at least 2000"),
        ({"bbox": (1, 2, 3)}, "four numbers"),
        ({"bbox": (4321000, 3210000, 4421000, 3310000)}, "50 km"),
        ({"n_s2_dates": 0}, "n_s2_dates=0"),
        ({"n_s1_dates": 2.5}, "n_s1_dates must be an integer"),
        ({"n_viirs_dates": 13}, "between 1 and 12"),
        ({"seed": -1}, "seed"),
        ({"href_base": ""}, "href_base"),
    ],
)
def test_bad_arguments_are_refused_with_a_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_demo_region(tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()


def test_module_exports():
    for name in synthetic.__all__:
        assert hasattr(synthetic, name)
