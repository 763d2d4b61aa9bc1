"""benchmarks/scale.py runs end to end on a small region, so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_scale_benchmark_smallest_region(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scale", SCRIPT)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    out = tmp_path / "results.json"
    scale.main(
        [
            "--sizes",
            "4",
            "--reps",
            "1",
            "--clusters",
            "20",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--densities-cells",
            "60",
            "240",
        ]
    )
    doc = json.loads(out.read_text())
    (r,) = doc["results"]
    assert r["pixels"] == 200 * 200 and r["tiles"] == 1
    assert all(r["timings_s"][k] > 0 for k in ("composite", "fit", "label_predict"))
    assert len(r["peak_rss_mb"]) == 3 and all(v > 50 for v in r["peak_rss_mb"].values())
    by_pass = r["peak_rss_mb_by_pass"]
    assert {"composite", "fit", "label_predict"} <= set(by_pass)  # sampled during each pass
    for proc, peak in r["peak_rss_mb"].items():  # the run's peak is the largest of a pass's
        assert peak == pytest.approx(max(d.get(proc, 0) for d in by_pass.values()))
    assert r["max_graph_tasks"] > 0 and r["cog_bytes"] > 0
    assert set(r["numpy_s"]) == {
        "fit",
        "label",
        "fractions_terms",
        "regression",
        "predict",
    }
    assert all(v > 0 for v in r["numpy_s"].values())
    # the per-pixel limits are timed with two processes at once, each on half the region
    assert list(r["two_core_s"]) == [*scale.PARALLEL_STEPS, *scale.CHECKS]
    two = r["two_core_s"]
    assert all(two[k] > 0 for k in scale.PARALLEL_STEPS)
    # the composite's limit read the tiles' own items onto their grids: every way of
    # warping gives the same pixels, and its composite is the stored one
    assert two["same_as_vrt_gather"] == 1.0 and two["same_as_vrt_reproject"] > 0.999
    assert two["composite_match"] == 1.0
    c = r["composite_limit"]
    assert c["read_by"] in scale.READS and c["median_by"] in scale.MEDIANS
    assert c["read"] == min(two[f"read_{h}"] for h in scale.READS)
    assert c["median"] == min(two[f"median_{m}"] for m in scale.MEDIANS)
    assert c["total"] == pytest.approx(c["read"] + two["mosaic"] + c["median"])
    assert r["limit_s"]["label_predict"] == pytest.approx(
        two["label"] + two["fractions_terms"] + two["predict"] + r["numpy_s"]["regression"]
    )
    assert r["limit_s"]["composite"] == pytest.approx(c["total"])
    assert r["limit_halved_s"] == scale.halved_limits(r)
    assert set(r["ratio"]) == {"composite", "fit", "label_predict"}
    assert r["timings_s"]["label_predict"] == pytest.approx(
        sum(r["timings_s"][k] for k in ("label", "regression", "predict"))
    )
    assert set(r["prototype_s"]) == {"fit", "label_predict"}
    assert len(list((tmp_path / "work" / "4km" / "prototype").glob("pop_*.tif"))) == 1
    assert doc["projection"]["core_hours"] > 0
    dens = doc["densities_fit"]  # timed on the run's own design, extrapolated by its power law
    assert list(dens["seconds"]) == ["60", "240"] and all(v > 0 for v in dens["seconds"].values())
    assert dens["columns"] % 20 == 0 and dens["eu_seconds_per_fit"] > 0
    assert dens["eu_seconds_per_fit"] == pytest.approx(
        dens["seconds"]["240"] * (dens["eu_cells"] / 240) ** dens["power"]
    )
    (summary,) = doc["summary"]  # one run: the medians are that run's figures
    assert summary["reps"] == 1 and summary["timings_s"] == r["timings_s"]
    for name, ratio in r["ratio"].items():
        assert summary["ratio"][name] == pytest.approx(ratio)
        assert summary["ratio_range"][name] == pytest.approx([ratio, ratio])
    assert summary["peak_rss_mb"] == r["peak_rss_mb"]
    assert summary["limit_halved_s"] == r["limit_halved_s"]
    assert "composite" in capsys.readouterr().out


def test_two_core_limits_fail_loudly_when_a_part_dies(tmp_path):
    spec = importlib.util.spec_from_file_location("scale", SCRIPT)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    with pytest.raises(RuntimeError, match="limit process exited with 1"):
        scale.two_core_limits(str(tmp_path / "missing.zarr"), tmp_path)


CONTINENT = Path(__file__).resolve().parents[1] / "benchmarks" / "continent.py"


def test_continent_benchmark_smallest(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("continent", CONTINENT)
    continent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(continent)
    out = tmp_path / "continent.json"
    continent.main(
        [
            "--sizes",
            "1",
            "--tiles",
            "16",
            "--dates",
            "8",
            "--fit-cells",
            "20000",
            "--fit-clusters",
            "10",
            "--fit-chunk",
            "5000",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    doc = json.loads(out.read_text())
    (r,) = doc["runs"]
    assert r["tiles"] == 16 and r["side_km"] == 8
    # every tile complete, each with its catalog record; items of several granules
    assert r["store"]["tiles_complete"] == r["store"]["tiles_total"] == 16
    assert r["store"]["catalog_records"] == 16 and r["store"]["items_recorded"] >= 16
    assert r["region"]["granules"] == 1 and r["region"]["items"] == 8
    assert set(r["pass_s"]) == {"composite", "label", "predict"}
    assert all(v > 0 for v in r["pass_s"].values())
    assert r["client_rss_peak_mb"] >= r["client_rss_start_mb"] > 50
    # the tile passes were sampled while they had tiles left, against 2 worker threads
    flight = r["in_flight"]["composite"]
    assert flight["samples_tiles_left"] > 0 and flight["threads"] == 2
    assert flight["median_in_flight"] >= 1
    assert r["pystac_items_held_max"] <= 10 and r["pystac_items_samples"] > 0
    assert r["metrics"]["r2_1km_in_sample"] > 0.3
    fit = doc["densities_fit"]
    assert fit["cells"] == 20000 and fit["columns"] == 30 and fit["fit_s"] > 0
    assert 0.9 * 20000 < fit["rows_seen"] <= 20000  # all known rows (about 5 % unknown)
    rec = fit["recovery"]
    assert rec["rel_error_median"] < 0.2 and abs(rec["held_out_total_error"]) < 0.05
    assert rec["held_out_r2"] > 0.9
    assert doc["checks"]["fit_client_growth_within_2gb"]
    assert "densities fit" in capsys.readouterr().out
