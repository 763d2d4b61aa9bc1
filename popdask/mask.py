"""A constraint mask: pixels where nobody can live (water, glaciers, ...), zero before the
census rescaling.

``mask: {path: water.tif, values: [1]}`` names a raster GDAL opens (any CRS; a local path
or a URL every worker reads) and its values that mean "nobody lives here" (default: any
non-zero value; nodata never masks). Each predict task reads the mask under its window,
warped onto the 20 m grid (nearest). Masked pixels get no people from the model; a cell's
census then goes to its other pixels, and a cell the mask empties entirely keeps its people
spread evenly over all its pixels (counted and reported, never dropped:
:func:`emptied_cells`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from popdask.grid import CRS, Grid


def masked_values(
    data: np.ndarray, valid: np.ndarray, values: Sequence[float] | None
) -> np.ndarray:
    """True where ``data`` (valid where ``valid``) says nobody lives: one of ``values``, or
    any non-zero value when ``values`` is None (pure)."""
    hit = np.isin(data, list(values)) if values is not None else (data != 0)
    return hit & valid & ~np.isnan(data.astype(np.float64, copy=False))


def read_mask(
    path: str,
    grid: Grid,
    ys: slice,
    xs: slice,
    values: Sequence[float] | None = None,
) -> np.ndarray:
    """``(y, x)`` booleans over the pixel window ``ys, xs`` of ``grid``: masked pixels."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from popdask.sources import gdal_path

    xmin, _, _, ymax = grid.bounds
    r = grid.resolution
    transform = Affine(r, 0.0, xmin + xs.start * r, 0.0, -r, ymax - ys.start * r)
    shape = (ys.stop - ys.start, xs.stop - xs.start)
    with rasterio.open(gdal_path(path)) as src:
        if src.crs is None:
            raise ValueError(
                f"{path}: the mask raster has no CRS; give it one (gdal_edit.py -a_srs)"
            )
        with WarpedVRT(
            src,
            crs=CRS,
            transform=transform,
            width=shape[1],
            height=shape[0],
            resampling=Resampling.nearest,
        ) as vrt:
            band = vrt.read(1, masked=True)
    return masked_values(band.filled(0), ~np.ma.getmaskarray(band), values)


def emptied_cells(allowed: np.ndarray, census: np.ndarray, cell_px: int) -> np.ndarray:
    """``(y_cell, x_cell)`` True where a cell has people in the census but the mask leaves
    none of its pixels (``allowed`` False everywhere in it)."""
    ny, nx = census.shape
    free = allowed.reshape(ny, cell_px, nx, cell_px).any(axis=(1, 3))
    census = np.asarray(census, np.float64)
    return ~free & np.isfinite(census) & (census > 0)


@dataclass(frozen=True)
class Mask:
    """What a task needs to read the mask under its window (small: it rides in the task)."""

    path: str
    values: tuple[float, ...] | None
    grid: Grid

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        return read_mask(self.path, self.grid, ys, xs, self.values)
