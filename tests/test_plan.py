"""`popdask plan`: the tiles, each tile's items per source, bytes, core-hours and store size
of a run, from the catalog alone (a real STAC API on loopback; no pixel read)."""

from __future__ import annotations

import re

import pytest
from conftest import write_config

from popdask import catalog, cli
from popdask.config import load_config
from popdask.plan import _tiles_to_search, plan

pytestmark = pytest.mark.integration


@pytest.fixture()
def config(tmp_path, demo_region, stac_api):
    return write_config(
        tmp_path, url=stac_api, census=demo_region.census, address="tcp://127.0.0.1:1"
    )


def test_plan_prints_tiles_items_bytes_and_core_hours(config, capsys):
    assert cli.main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "4 tiles of 3 km" in out and "catalog searched for 4 tiles" in out
    cfg = load_config(config)
    # the items each tile would composite, as the composite task chooses them
    want = sum(
        catalog.tile_items(s.name, s.config, url=s.url, bounds_3035=t.bounds).kept
        for s in catalog.sources_of(cfg)
        if s.name == "sentinel2"
        for t in cfg.make_grid().tiles()
    )
    assert want > 0
    assert re.search(rf"sentinel2: {want} items to composite", out), out
    for name in ("sentinel1", "nightlights"):
        assert f"  {name}: " in out
    assert re.search(r"[\d.]+ (kB|MB|GB) to read", out)
    assert re.search(r"expected: [\d.e-]+ core-hours", out)
    assert "store: about" in out and "0 tiles without any" in out
    assert not (config.parent / "out.zarr").exists()  # nothing written


def test_plan_extrapolates_from_an_even_sample(config):
    cfg = load_config(config)
    tiles = cfg.make_grid().tiles()
    assert [t.id for t in _tiles_to_search(tiles, 2)] == [tiles[0].id, tiles[2].id]
    full, half = plan(cfg, sample=None), plan(cfg, sample=2)
    assert (full.searched, half.searched, half.factor) == (4, 2, 2.0)
    assert full.core_hours > 0 and full.store_bytes > 0
    s2 = full.sources["sentinel2"]
    assert s2.items >= 4 and s2.tiles_without == 0


@pytest.mark.parametrize("source", ["sentinel2", "nightlights"])
def test_plan_fails_in_one_line_when_a_source_has_no_item(config, source, capsys):
    assert cli.main(["plan", str(config), f"--set=sources.{source}.collection=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"sources.{source}" in err and "'nope'" in err and "collection" in err
