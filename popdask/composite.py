"""Per-pixel compositing kernels: pure NumPy on one tile's full time column.

Each kernel takes the stack of one tile as ``(time, band, y, x)`` float32 with NaN nodata,
mosaics the items of the same acquisition day (first valid pixel wins, so overlapping
granules of one date are counted once), and reduces the days to their per-pixel median.
The dask graph feeds these kernels one tile at a time with the whole time axis in a single
chunk (a median across time chunks would shuffle the whole cube).
"""

from __future__ import annotations

import warnings

import numpy as np

#: How a composite band is turned into features (see :mod:`popdask.features`).
REFLECTANCE, BACKSCATTER, RADIANCE = "reflectance", "backscatter_db", "radiance"


def mosaic_by_group(stack: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Collapse items of the same group (acquisition day) into one, first valid value wins.

    Parameters
    ----------
    stack
        ``(time, ...)`` float array, NaN where no data.
    groups
        ``(time,)`` integer group of each item.

    Returns
    -------
    numpy.ndarray
        ``(n_groups, ...)`` in order of first appearance of each group.
    """
    groups = np.asarray(groups)
    if groups.shape != stack.shape[:1]:
        raise ValueError(f"groups has shape {groups.shape}, expected ({stack.shape[0]},)")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # groups in order of first appearance
    out = np.full((len(order), *stack.shape[1:]), np.nan, dtype=stack.dtype)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    for t in range(stack.shape[0]):
        g = rank[inverse[t]]
        np.copyto(out[g], stack[t], where=np.isnan(out[g]))
    return out


def nanmedian_time(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN; all-NaN pixels stay NaN without a warning."""
    if stack.shape[0] == 0:
        return np.full(stack.shape[1:], np.nan, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(stack, axis=0).astype(np.float32, copy=False)


def optical_composite(
    stack: np.ndarray,
    *,
    groups: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    mask_band: int | None = None,
    mask_values: tuple[int, ...] = (0, 1, 3, 8, 9, 10, 11),
) -> np.ndarray:
    """Cloud-masked median reflectance of one tile.

    Parameters
    ----------
    stack
        ``(time, band, y, x)`` raw digital numbers, NaN nodata. When ``mask_band`` is given
        that band holds the scene classification (Sentinel-2 SCL) and is not returned.
    groups
        ``(time,)`` acquisition-day index of each item (granules of one day share it).
    scale, offset
        ``(time, band)`` per item and band: reflectance = DN × scale + offset (offset carries
        the processing baseline ≥ 04.00 shift of −1000 DN).
    mask_band
        Index of the classification band, or None for no masking.
    mask_values
        Classification values to drop (nodata, saturated, shadow, clouds, cirrus, snow).

    Returns
    -------
    numpy.ndarray
        ``(band, y, x)`` float32 reflectance (without the mask band), NaN where no clear
        observation exists.
    """
    data = stack.astype(np.float32, copy=True)
    data *= np.asarray(scale, np.float32)[:, :, None, None]
    data += np.asarray(offset, np.float32)[:, :, None, None]
    if mask_band is not None:
        scl = stack[:, mask_band]
        bad = np.isnan(scl) | np.isin(scl, np.asarray(mask_values, np.float32))
        data = np.delete(data, mask_band, axis=1)
        data[np.broadcast_to(bad[:, None], data.shape)] = np.nan
    return nanmedian_time(mosaic_by_group(data, groups))


def radar_composite(stack: np.ndarray, *, groups: np.ndarray) -> np.ndarray:
    """Median backscatter in dB of one tile from linear power ``(time, band, y, x)``."""
    med = nanmedian_time(mosaic_by_group(stack.astype(np.float32, copy=False), groups))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (10.0 * np.log10(np.maximum(med, 1e-6))).astype(np.float32)


def median_composite(stack: np.ndarray, *, groups: np.ndarray) -> np.ndarray:
    """Plain per-pixel median of one tile ``(time, band, y, x)`` (night lights)."""
    return nanmedian_time(mosaic_by_group(stack.astype(np.float32, copy=False), groups))
