"""The EPSG:3035 work grid: pixels, 1 km census cells and tiles.

Pixels are ``resolution`` metres (default 20 m) with edges on multiples of the resolution,
census cells are ``cell`` metres (the GISCO 1 km grid, edges on multiples of 1000 m) and
tiles are ``tile`` metres (default 10 km). The region is the requested bounding box snapped
outwards to whole cells; tiles are cut from the region's top-left corner, so every tile
except the last column and row is a full ``tile`` square and every tile holds whole cells.
Everything here is pure arithmetic: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from affine import Affine

EPSG = 3035
CRS = f"EPSG:{EPSG}"

BBox = tuple[float, float, float, float]


def snap_bbox(bbox: BBox, cell: float = 1000.0) -> tuple[int, int, int, int]:
    """Snap ``(xmin, ymin, xmax, ymax)`` outwards to multiples of ``cell``.

    Examples
    --------
    >>> snap_bbox((4321010.0, 3210500.0, 4330990.0, 3219999.0))
    (4321000, 3210000, 4331000, 3220000)
    """
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    if not (xmax > xmin and ymax > ymin):
        raise ValueError(
            f"bbox {bbox!r} is empty or inverted: it must be (xmin, ymin, xmax, ymax) "
            "with xmax > xmin and ymax > ymin (EPSG:3035 metres)."
        )
    c = float(cell)
    return (
        int(np.floor(xmin / c) * c),
        int(np.floor(ymin / c) * c),
        int(np.ceil(xmax / c) * c),
        int(np.ceil(ymax / c) * c),
    )


def tile_id(x0: float, y0: float) -> str:
    """Name of the tile whose lower-left corner is ``(x0, y0)``, e.g. ``"N3210E4320"`` (km)."""
    return f"N{round(y0 / 1000)}E{round(x0 / 1000)}"


@dataclass(frozen=True)
class Tile:
    """One tile of the grid: a window of whole cells.

    ``row``/``col`` index the tile in the region (row 0 is the northernmost); ``ys``/``xs``
    are pixel slices into the region's ``(y, x)`` arrays and ``ys_cell``/``xs_cell`` cell
    slices into its ``(y_cell, x_cell)`` arrays.
    """

    row: int
    col: int
    bounds: tuple[int, int, int, int]
    ys: slice
    xs: slice
    ys_cell: slice
    xs_cell: slice

    @property
    def id(self) -> str:
        return tile_id(self.bounds[0], self.bounds[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ys.stop - self.ys.start, self.xs.stop - self.xs.start)


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a region.

    Parameters
    ----------
    bounds
        ``(xmin, ymin, xmax, ymax)`` in EPSG:3035 metres, multiples of ``cell``.
        Use :meth:`Grid.from_bbox` to snap an arbitrary box.
    resolution, cell, tile
        Pixel, census cell and tile sizes in metres. ``cell`` must be a multiple of
        ``resolution`` and ``tile`` a multiple of ``cell``.
    """

    bounds: tuple[int, int, int, int]
    resolution: int = 20
    cell: int = 1000
    tile: int = 10000

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.cell % self.resolution:
            raise ValueError(
                f"grid.cell ({self.cell} m) must be a positive multiple of grid.resolution "
                f"({self.resolution} m), so that every census cell holds whole pixels."
            )
        if self.tile % self.cell:
            raise ValueError(
                f"grid.tile ({self.tile} m) must be a multiple of grid.cell ({self.cell} m): "
                "tiles are cut along census cell edges."
            )
        if snap_bbox(self.bounds, self.cell) != tuple(self.bounds):
            raise ValueError(
                f"Grid bounds {self.bounds} are not on multiples of {self.cell} m; "
                "build the grid with Grid.from_bbox(bbox) to snap them."
            )

    @classmethod
    def from_bbox(
        cls, bbox: BBox, *, resolution: int = 20, cell: int = 1000, tile: int = 10000
    ) -> Grid:
        """Grid over ``bbox`` (EPSG:3035 metres) snapped outwards to whole cells."""
        return cls(snap_bbox(bbox, cell), resolution=resolution, cell=cell, tile=tile)

    # -- sizes --------------------------------------------------------------------------
    @property
    def cell_px(self) -> int:
        """Pixels along one side of a census cell (50 for 1 km / 20 m)."""
        return self.cell // self.resolution

    @property
    def tile_px(self) -> int:
        """Pixels along one side of a full tile (500 for 10 km / 20 m)."""
        return self.tile // self.resolution

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` pixels."""
        xmin, ymin, xmax, ymax = self.bounds
        return ((ymax - ymin) // self.resolution, (xmax - xmin) // self.resolution)

    @property
    def cell_shape(self) -> tuple[int, int]:
        """``(ny_cell, nx_cell)`` census cells."""
        ny, nx = self.shape
        return (ny // self.cell_px, nx // self.cell_px)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of tiles."""
        ny, nx = self.shape
        return (-(-ny // self.tile_px), -(-nx // self.tile_px))

    @property
    def transform(self) -> Affine:
        """Affine transform of the pixel grid (north up)."""
        xmin, _, _, ymax = self.bounds
        return Affine(self.resolution, 0.0, xmin, 0.0, -self.resolution, ymax)

    @property
    def cell_transform(self) -> Affine:
        """Affine transform of the census cell grid."""
        xmin, _, _, ymax = self.bounds
        return Affine(self.cell, 0.0, xmin, 0.0, -self.cell, ymax)

    # -- coordinates --------------------------------------------------------------------
    def coords(self) -> dict[str, np.ndarray]:
        """Pixel-centre coordinates ``x`` (ascending) and ``y`` (descending)."""
        xmin, _, _, ymax = self.bounds
        ny, nx = self.shape
        r = self.resolution
        return {
            "y": ymax - r * (np.arange(ny) + 0.5),
            "x": xmin + r * (np.arange(nx) + 0.5),
        }

    def cell_coords(self) -> dict[str, np.ndarray]:
        """Cell-centre coordinates ``x_cell`` (ascending) and ``y_cell`` (descending)."""
        xmin, _, _, ymax = self.bounds
        ny, nx = self.cell_shape
        c = self.cell
        return {
            "y_cell": ymax - c * (np.arange(ny) + 0.5),
            "x_cell": xmin + c * (np.arange(nx) + 0.5),
        }

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunks along ``(y, x)`` that match the tiles."""
        ny, nx = self.shape
        t = self.tile_px
        return (_split(ny, t), _split(nx, t))

    # -- tiles --------------------------------------------------------------------------
    def tiles(self) -> list[Tile]:
        """All tiles, row by row from the north-west corner."""
        return list(self._iter_tiles())

    def _iter_tiles(self) -> Iterator[Tile]:
        xmin, _, _, ymax = self.bounds
        ny, nx = self.shape
        t, c, r = self.tile_px, self.cell_px, self.resolution
        rows, cols = self.tile_shape
        for i in range(rows):
            y0, y1 = i * t, min((i + 1) * t, ny)
            for j in range(cols):
                x0, x1 = j * t, min((j + 1) * t, nx)
                bounds = (xmin + x0 * r, ymax - y1 * r, xmin + x1 * r, ymax - y0 * r)
                yield Tile(
                    row=i,
                    col=j,
                    bounds=bounds,
                    ys=slice(y0, y1),
                    xs=slice(x0, x1),
                    ys_cell=slice(y0 // c, y1 // c),
                    xs_cell=slice(x0 // c, x1 // c),
                )

    def find_tile(self, id_or_index: str | tuple[int, int]) -> Tile:
        """Look a tile up by id (``"N3210E4320"``) or by ``(row, col)``."""
        for t in self._iter_tiles():
            if id_or_index in (t.id, (t.row, t.col)):
                return t
        raise KeyError(f"No tile {id_or_index!r} in grid {self.bounds}.")

    def expand(self, tile: Tile, margin_px: int) -> tuple[slice, slice]:
        """Pixel slices of ``tile`` grown by ``margin_px`` on each side, clipped to the region."""
        ny, nx = self.shape
        return (
            slice(max(tile.ys.start - margin_px, 0), min(tile.ys.stop + margin_px, ny)),
            slice(max(tile.xs.start - margin_px, 0), min(tile.xs.stop + margin_px, nx)),
        )


def _split(n: int, size: int) -> tuple[int, ...]:
    full, rest = divmod(n, size)
    return (size,) * full + ((rest,) if rest else ())


def cell_id(x_llc: float, y_llc: float, cell: int = 1000) -> str:
    """GISCO ``GRD_ID`` of the cell with lower-left corner ``(x_llc, y_llc)``.

    Examples
    --------
    >>> cell_id(4334000, 2684000)
    'CRS3035RES1000mN2684000E4334000'
    """
    return f"CRS3035RES{cell}mN{int(y_llc)}E{int(x_llc)}"
