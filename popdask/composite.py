"""Per-pixel compositing kernels on one tile's full time column (NumPy, the median in numba).

Each kernel takes the stack of one tile as ``(time, band, y, x)`` float32 with NaN nodata,
mosaics the items of the same acquisition day (first valid pixel wins, so overlapping
granules of one date are counted once), and reduces the days to their per-pixel median.
The dask graph feeds these kernels one tile at a time with the whole time axis in a single
chunk (a median across time chunks would shuffle the whole cube). The median is a sorting
network compiled by numba: the pass is then bound by its reads (benchmarks/README.md).
"""

from __future__ import annotations

import functools

import numba
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


#: Pixels the median kernel sorts at once: a (dates × block) float32 buffer that stays in
#: the core's L1/L2 cache (24 dates: 96 KB).
MEDIAN_BLOCK = 1024


@functools.lru_cache(maxsize=64)
def median_network(n: int) -> np.ndarray:
    """Batcher's odd-even merge sort of ``n`` values: ``(comparators, 2)`` index pairs.

    Built for the next power of two; the comparators that touch the padding are dropped
    (the padding holds +inf, so they never swap). 19 comparators for 8 values, 63 for 16.
    """
    p2 = 1 << max(n - 1, 0).bit_length()
    pairs = []
    p = 1
    while p < p2:
        k = p
        while k >= 1:
            for j in range(k % p, p2 - k, 2 * k):
                for i in range(min(k, p2 - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    out = np.array(pairs, np.int64).reshape(-1, 2)
    out.flags.writeable = False
    return out


@numba.njit(nogil=True, cache=True)
def _network_median(flat, pairs, out, block):  # pragma: no cover - compiled by numba
    t, n = flat.shape
    buf = np.empty((t, block), np.float32)
    count = np.empty(block, np.int64)
    inf = np.float32(np.inf)
    for s in range(0, n, block):
        m = min(block, n - s)
        count[:m] = 0
        for i in range(t):
            for q in range(m):
                v = flat[i, s + q]
                if v == v:
                    buf[i, q] = v
                    count[q] += 1
                else:
                    buf[i, q] = inf
        for c in range(pairs.shape[0]):
            a, b = pairs[c, 0], pairs[c, 1]
            for q in range(m):
                x, y = buf[a, q], buf[b, q]
                buf[a, q] = min(x, y)
                buf[b, q] = max(x, y)
        for q in range(m):
            k = count[q]
            if k == 0:
                out[s + q] = np.nan
            elif k % 2:
                out[s + q] = buf[k // 2, q]
            else:
                out[s + q] = (buf[k // 2 - 1, q] + buf[k // 2, q]) / np.float32(2)


def nanmedian_time(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN; all-NaN pixels stay NaN without a warning.

    Equal to ``np.nanmedian(stack, axis=0)`` in float32 (the mean of the two middle values
    for an even count, in float32). A sorting network (:func:`median_network`) over blocks
    of :data:`MEDIAN_BLOCK` pixels, NaN as +inf, then the middle of each pixel's valid
    values: branch-free and in cache, 3–4× faster than a sort along time
    (:func:`nanmedian_sort`) and 10× faster than ``np.nanmedian`` on a tile's stack
    (benchmarks/README.md).
    """
    stack = np.asarray(stack, dtype=np.float32)
    t = stack.shape[0]
    if t == 0:
        return np.full(stack.shape[1:], np.nan, dtype=np.float32)
    flat = np.ascontiguousarray(stack).reshape(t, -1)
    out = np.empty(flat.shape[1], np.float32)
    _network_median(flat, median_network(t), out, MEDIAN_BLOCK)
    return out.reshape(stack.shape[1:])


def nanmedian_sort(stack: np.ndarray) -> np.ndarray:
    """:func:`nanmedian_time` in NumPy: one sort along time (NaN sorts last) and a gather
    at the middle of each pixel's valid values (popdask's kernel before the network; kept
    as the reference the tests compare it with)."""
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


# --------------------------------------------------------------------------------------
# The radiometric offset of each Sentinel-2 item, checked against its own pixels
# --------------------------------------------------------------------------------------
# Catalog metadata says whether ESA's BOA_ADD_OFFSET (−1000 DN, baseline 04.00 on) is still
# in an item's DNs, and is wrong for some items in both directions (Element84/earth-search
# #66, #71; cirrus-geo/cirrus-earth-search #33). An item whose offset should have been
# −0.1 but got 0 reads 0.1 too bright everywhere: its darkest clear pixels (water, shadow,
# dense forest, which every 10 km tile holds some of) sit near 0.1 instead of near 0. An item
# given −0.1 that should have had 0 reads 0.1 too dark: most of its clear pixels are below 0.
#: Fewest clear pixels of an item (one km² at 20 m) to judge its offset; fewer: not judged.
OFFSET_MIN_PIXELS = 2500
#: Percentile taken as an item's darkest clear pixels: 1 % of a 10 km tile is 1 km², more
#: than any single bright field or roof, less than the water, shadow and forest of a tile.
OFFSET_DARK_PERCENTILE = 1.0
#: Reflectance the darkest 1 % reaches only when the offset is missing: water, shadow and
#: forest are 0.00–0.05 in the visible bands; 0.09 leaves 0.04 for haze and bright tiles,
#: and correcting an item at 0.09 by −0.1 still leaves its darkest 1 % at −0.01.
OFFSET_BRIGHT = 0.09
#: Share of clear pixels below 0 that only a doubled offset gives: true L2A reflectance
#: is rarely negative (a few % of dark water at most), while −0.1 too much puts every pixel
#: darker than 0.1 (vegetation, water, shadow, most roads: over half of any land tile)
#: below 0.
OFFSET_NEGATIVE_SHARE = 0.2
#: Most clear pixels that may still be negative once +0.1 is given back: more, and the
#: item is wrong in some other way than the offset (it is then left as it is).
OFFSET_NEGATIVE_AFTER = 0.02
#: The verdicts, by the code :func:`offset_checks` writes in its ``reason`` column.
OFFSET_REASONS = ("ok", "too_few_pixels", "offset_missing", "offset_doubled", "implausible")
#: Columns of :func:`offset_checks`' rows.
OFFSET_COLUMNS = ("pixels", "dark", "negative", "negative_after", "offset", "delta", "reason")


def offset_evidence(values: np.ndarray, step: float) -> tuple[int, float, float, float]:
    """What an item's clear pixels say about its offset.

    Parameters
    ----------
    values
        Reflectance of one visible band (offset applied as the metadata says); NaN where
        not clear (nodata, masked by the scene classification).
    step
        The BOA offset in reflectance (1000 DN × scale: 0.1).

    Returns
    -------
    pixels, dark, negative, negative_after
        Clear pixels; their :data:`OFFSET_DARK_PERCENTILE` percentile; the share below 0;
        the share below ``-step`` (still negative were ``step`` given back). NaN figures
        without a clear pixel.
    """
    v = np.asarray(values, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return 0, np.nan, np.nan, np.nan
    dark = float(np.percentile(v, OFFSET_DARK_PERCENTILE))
    return int(v.size), dark, float(np.mean(v < 0)), float(np.mean(v < -step))


def judge_offset(
    pixels: int, dark: float, negative: float, negative_after: float, *, offset: float, step: float
) -> tuple[float, str]:
    """The correction of an item's offset its own pixels call for (pure).

    Only the two offsets a Sentinel-2 L2A item can have are considered: 0 and ``-step``.
    An item at 0 whose darkest pixels are at least :data:`OFFSET_BRIGHT` gets ``-step``
    (``offset_missing``); an item at ``-step`` with at least
    :data:`OFFSET_NEGATIVE_SHARE` of its clear pixels below 0, and at most
    :data:`OFFSET_NEGATIVE_AFTER` still below 0 once ``step`` is given back, gets ``+step``
    (``offset_doubled``). Evidence against an offset that no flip explains is
    ``implausible`` and left as it is; under :data:`OFFSET_MIN_PIXELS` clear pixels
    nothing is judged (``too_few_pixels``).

    Returns
    -------
    delta, reason
        What to add to the item's offset (0, ``-step`` or ``+step``), and why.

    Examples
    --------
    >>> judge_offset(10_000, 0.11, 0.0, 0.0, offset=0.0, step=0.1)
    (-0.1, 'offset_missing')
    >>> judge_offset(10_000, -0.08, 0.9, 0.0, offset=-0.1, step=0.1)
    (0.1, 'offset_doubled')
    >>> judge_offset(10_000, 0.01, 0.0, 0.0, offset=-0.1, step=0.1)
    (0.0, 'ok')
    """
    if pixels < OFFSET_MIN_PIXELS:
        return 0.0, "too_few_pixels"
    at_zero, at_step = abs(offset) < step / 2, abs(offset + step) < step / 2
    if dark >= OFFSET_BRIGHT:
        return (-step, "offset_missing") if at_zero else (0.0, "implausible")
    if negative >= OFFSET_NEGATIVE_SHARE:
        if at_step and negative_after <= OFFSET_NEGATIVE_AFTER:
            return step, "offset_doubled"
        return 0.0, "implausible"
    return 0.0, "ok"


def offset_checks(
    stack: np.ndarray,
    *,
    scale: np.ndarray,
    offset: np.ndarray,
    band: int,
    step_dn: float = 1000.0,
    mask_band: int | None = None,
    mask_values: tuple[int, ...] = (0, 1, 3, 8, 9, 10, 11),
) -> np.ndarray:
    """Each item's offset checked against its own clear pixels of band ``band``.

    Parameters
    ----------
    stack
        ``(time, band, y, x)`` raw digital numbers of one tile, NaN nodata.
    scale, offset
        ``(time, band)`` as the metadata gives them (:func:`popdask.sources.scale_offset`).
    band
        Index of the visible band judged (blue where there is one: the darkest targets).
    step_dn
        The BOA offset in DN (ESA's BOA_ADD_OFFSET, 1000).
    mask_band, mask_values
        The scene classification band and the classes that are not clear (as
        :func:`optical_composite` masks them).

    Returns
    -------
    numpy.ndarray
        ``(time, 7)`` float64 rows of :data:`OFFSET_COLUMNS`: the evidence of
        :func:`offset_evidence`, the metadata's offset of ``band``, the ``delta`` to add to
        the item's offset and the index of its reason in :data:`OFFSET_REASONS`.
    """
    out = np.empty((stack.shape[0], len(OFFSET_COLUMNS)), dtype=np.float64)
    bad = np.asarray(mask_values, np.float32)
    for t in range(stack.shape[0]):
        dn = stack[t, band]
        if mask_band is not None:
            dn = np.where(np.isin(stack[t, mask_band], bad), np.nan, dn)
        step = float(step_dn * scale[t, band])
        values = np.multiply(dn, np.float32(scale[t, band]), dtype=np.float32)
        values += np.float32(offset[t, band])
        evidence = offset_evidence(values, step)
        delta, reason = judge_offset(*evidence, offset=float(offset[t, band]), step=step)
        out[t] = (*evidence, offset[t, band], delta, OFFSET_REASONS.index(reason))
    return out


def checked_optical_composite(
    stack: np.ndarray,
    checks: np.ndarray,
    *,
    groups: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    mask_band: int | None = None,
    mask_values: tuple[int, ...] = (0, 1, 3, 8, 9, 10, 11),
) -> np.ndarray:
    """:func:`optical_composite` with each item's offset corrected by its row of
    :func:`offset_checks` (``checks``; the mask band's offset is left alone)."""
    delta = np.asarray(checks, np.float64)[:, OFFSET_COLUMNS.index("delta")]
    corrected = np.array(offset, dtype=np.float64)
    keep = np.ones(corrected.shape[1], bool)
    if mask_band is not None:
        keep[mask_band] = False
    corrected[:, keep] += delta[:, None]
    return optical_composite(
        stack,
        groups=groups,
        scale=scale,
        offset=corrected,
        mask_band=mask_band,
        mask_values=mask_values,
    )
