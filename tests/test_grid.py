import numpy as np
import pytest

from popdask.grid import Grid, cell_id, snap_bbox, tile_id


def test_snap_bbox_outwards_to_cells():
    assert snap_bbox((4321010, 3210500, 4330990, 3219999)) == (4321000, 3210000, 4331000, 3220000)
    assert snap_bbox((4321000, 3210000, 4322000, 3211000)) == (4321000, 3210000, 4322000, 3211000)
    with pytest.raises(ValueError, match="empty or inverted"):
        snap_bbox((10, 10, 5, 20))


def test_grid_shapes_and_transform():
    g = Grid.from_bbox((4321000, 3210000, 4346000, 3222000))  # 25 × 12 km
    assert g.shape == (600, 1250)
    assert g.cell_shape == (12, 25)
    assert g.tile_shape == (2, 3)
    assert g.cell_px == 50 and g.tile_px == 500
    assert g.transform.c == 4321000 and g.transform.f == 3222000 and g.transform.e == -20
    assert g.chunks() == ((500, 100), (500, 500, 250))


def test_coords_are_pixel_centres():
    g = Grid.from_bbox((4321000, 3210000, 4322000, 3211000))
    c = g.coords()
    assert c["x"][0] == 4321010 and c["x"][-1] == 4321990
    assert c["y"][0] == 3210990 and c["y"][-1] == 3210010
    cc = g.cell_coords()
    assert cc["x_cell"].tolist() == [4321500] and cc["y_cell"].tolist() == [3210500]


def test_tiles_cover_region_once_and_hold_whole_cells():
    g = Grid.from_bbox((4321000, 3210000, 4346000, 3222000))
    cover = np.zeros(g.shape, int)
    ccover = np.zeros(g.cell_shape, int)
    for t in g.tiles():
        cover[t.ys, t.xs] += 1
        ccover[t.ys_cell, t.xs_cell] += 1
        assert t.ys.start % g.cell_px == 0 and t.xs.stop % g.cell_px == 0
        # tile bounds agree with its pixel window
        assert t.bounds[0] == 4321000 + t.xs.start * 20
        assert t.bounds[3] == 3222000 - t.ys.start * 20
    assert (cover == 1).all() and (ccover == 1).all()
    ids = [t.id for t in g.tiles()]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "N3212E4321"  # north-west tile: lower-left corner at (4321, 3212) km
    assert g.find_tile(ids[4]) == g.find_tile((1, 1))


def test_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"multiple of grid\.resolution"):
        Grid.from_bbox((0, 0, 1000, 1000), resolution=30)
    with pytest.raises(ValueError, match=r"multiple of grid\.cell"):
        Grid.from_bbox((0, 0, 1000, 1000), tile=1500)
    with pytest.raises(ValueError, match="from_bbox"):
        Grid((10, 0, 1000, 1000))


def test_expand_clips_to_region():
    g = Grid.from_bbox((0, 0, 20000, 20000))
    t = g.find_tile((0, 1))
    ys, xs = g.expand(t, 50)
    assert (ys.start, ys.stop, xs.start, xs.stop) == (0, 550, 450, 1000)


def test_ids():
    assert tile_id(4320000, 3210000) == "N3210E4320"
    assert cell_id(4334000, 2684000) == "CRS3035RES1000mN2684000E4334000"
