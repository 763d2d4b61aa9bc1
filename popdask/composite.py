"""Per-pixel compositing kernels: pure NumPy on one tile's full time column.

Each kernel takes the stack of one tile as ``(time, band, y, x)`` float32 with NaN nodata,
mosaics the items of the same acquisition day (first valid pixel wins, so overlapping
granules of one date are counted once), and reduces the days to their per-pixel median.
The dask graph feeds these kernels one tile at a time with the whole time axis in a single
chunk (a median across time chunks would shuffle the whole cube).
"""

from __future__ import annotations

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
    """Median over axis 0 ignoring NaN; all-NaN pixels stay NaN without a warning.

    Equal to ``np.nanmedian(stack, axis=0)`` in float32 (the mean of the two middle values
    for an even count, rounded as NumPy rounds it), about 4× faster on a tile's short time
    axis: one sort along time (NaN sorts last) and a gather at the middle of each pixel's
    valid values, instead of NumPy's masked-array path.
    """
    stack = np.asarray(stack, dtype=np.float32)
    if stack.shape[0] == 0:
        return np.full(stack.shape[1:], np.nan, dtype=np.float32)
    n = np.count_nonzero(~np.isnan(stack), axis=0)
    ordered = np.sort(stack, axis=0)
    np.maximum(n, 1, out=n)  # all-NaN: index 0 holds NaN, the answer
    lo = np.take_along_axis(ordered, ((n - 1) // 2)[None], axis=0)[0]
    hi = np.take_along_axis(ordered, (n // 2)[None], axis=0)[0]
    del ordered
    even = n % 2 == 0
    # (lo + hi) / 2 where the count is even, as np.median's mean of the middle two
    with np.errstate(over="ignore", invalid="ignore"):  # ±inf and overflow as np.nanmedian
        np.add(lo, hi, out=hi, where=even)
        np.divide(hi, np.float32(2), out=lo, where=even)
    return lo


def mosaic_scaled(
    stack: np.ndarray,
    groups: np.ndarray,
    *,
    bands: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`mosaic_by_group` of ``stack[:, bands] × scale + offset`` with ``valid`` applied.

    One pass per item into the per-day output, without the full-size float copies
    (scaled stack, band deletion, broadcast mask) of doing it step by step; values equal to
    ``mosaic_by_group(masked (stack × scale + offset), groups)`` computed in float32.

    Parameters
    ----------
    stack
        ``(time, band, y, x)``, NaN where no data.
    groups
        ``(time,)`` acquisition-day index of each item.
    bands
        Band indices kept (default all).
    scale, offset
        ``(time, band)`` over all bands of ``stack`` (default 1 and 0).
    valid
        ``(time, y, x)`` bool: False drops the pixel of every band of that item (cloud).
    """
    groups = np.asarray(groups)
    if groups.shape != stack.shape[:1]:
        raise ValueError(f"groups has shape {groups.shape}, expected ({stack.shape[0]},)")
    bands = np.arange(stack.shape[1]) if bands is None else np.asarray(bands)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # groups in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    out = np.full((len(order), len(bands), *stack.shape[2:]), np.nan, dtype=np.float32)
    s32 = None if scale is None else np.asarray(scale, np.float32)
    o32 = None if offset is None else np.asarray(offset, np.float32)
    for t in range(stack.shape[0]):
        g = rank[inverse[t]]
        for j, b in enumerate(bands):
            dst = out[g, j]
            where = np.isnan(dst)
            if valid is not None:
                where &= valid[t]
            values = stack[t, b]
            if s32 is not None:  # a new array: the input is never modified
                values = np.multiply(values, s32[t, b], dtype=np.float32)
            elif o32 is not None:
                values = values.astype(np.float32)
            if o32 is not None:
                values += o32[t, b]
            np.copyto(dst, values, where=where)
    return out


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
    bands = np.arange(stack.shape[1])
    valid = None
    if mask_band is not None:
        scl = stack[:, mask_band]
        valid = ~(np.isnan(scl) | np.isin(scl, np.asarray(mask_values, np.float32)))
        bands = np.delete(bands, mask_band)
    days = mosaic_scaled(stack, groups, bands=bands, scale=scale, offset=offset, valid=valid)
    return nanmedian_time(days)


def radar_composite(
    stack: np.ndarray,
    *,
    groups: np.ndarray,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Median backscatter in dB of one tile from linear power ``(time, band, y, x)``.

    ``scale``/``offset`` (``(time, band)``, optional) turn DNs into linear power first.
    """
    med = median_composite(stack, groups=groups, scale=scale, offset=offset)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (10.0 * np.log10(np.maximum(med, 1e-6))).astype(np.float32)


def median_composite(
    stack: np.ndarray,
    *,
    groups: np.ndarray,
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Plain per-pixel median of one tile ``(time, band, y, x)`` (night lights).

    ``scale``/``offset`` (``(time, band)``, optional) turn DNs into radiance first.
    """
    return nanmedian_time(mosaic_scaled(stack, groups, scale=scale, offset=offset))
