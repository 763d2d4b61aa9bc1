"""A constraint mask: pixels where nobody can live (water, glaciers, ...), zero before the
census rescaling.

``mask: {path: water.tif, values: [1]}`` names a raster GDAL opens (any CRS; a local path
or a URL every worker reads), or ``mask: {collection: esa-worldcover, asset: map, values:
[80]}`` a STAC collection whose items over each window are read, and the values that mean
"nobody lives here" (default: any non-zero value; nodata never masks). Each predict task
reads the mask under its window, warped onto the 20 m grid (nearest). Masked pixels get no
people from the model; a cell's census then goes to its other pixels, and a cell the mask
empties entirely keeps its people spread evenly over all its pixels (counted and reported,
never dropped: :func:`emptied_cells`).
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
    """What a task needs to read the mask under its window (small: it rides in the task):
    a raster's ``path``, or a STAC ``collection`` at ``url`` whose ``asset`` of the items
    over the window is read (all of them: a pixel is masked if any says so)."""

    values: tuple[float, ...] | None
    grid: Grid
    path: str | None = None
    collection: str | None = None
    url: str | None = None
    asset: str = "map"
    datetime: str | None = None
    sign: str | None = None

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        hrefs = [self.path] if self.path else self._hrefs(ys, xs)
        out = np.zeros((ys.stop - ys.start, xs.stop - xs.start), bool)
        for href in hrefs:
            out |= read_mask(href, self.grid, ys, xs, self.values)
        return out

    def _hrefs(self, ys: slice, xs: slice) -> list[str]:
        from popdask.catalog import bounds_lonlat, search_items

        xmin, _, _, ymax = self.grid.bounds
        r = self.grid.resolution
        box = (xmin + xs.start * r, ymax - ys.stop * r, xmin + xs.stop * r, ymax - ys.start * r)
        items = search_items(
            self.url,
            self.collection,
            bbox_lonlat=bounds_lonlat(box),
            datetime=self.datetime,
            name="mask",
        )
        hrefs = []
        for item in items:
            assets = item.get("assets") or {}
            if self.asset not in assets:
                raise ValueError(
                    f"mask: item {item.get('id')!r} of {self.collection!r} has no asset "
                    f"{self.asset!r}; set mask.asset to one of {sorted(assets)}"
                )
            hrefs.append(assets[self.asset]["href"])
        if self.sign == "planetary_computer":
            import planetary_computer

            hrefs = [planetary_computer.sign(h) for h in hrefs]
        return hrefs
