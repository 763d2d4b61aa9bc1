"""The per-pixel feature transform: pure NumPy, applied to composites.

``"log"``: reflectance is log-transformed with an offset of about the 1st percentile of
surface reflectance (0.015, i.e. 150 DN), radar is already in dB (clipped to a physical
range), night-light radiance is log1p-transformed. ``"raw"``: the composite values as they
are (radar clipped alike). Which one a run uses is ``model.transform``: the accuracy
protocol decides its default (benchmarks/README.md). Standardisation, PCA and k-means live in
:mod:`popdask.model`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from popdask.composite import BACKSCATTER, RADIANCE, REFLECTANCE

REFLECTANCE_OFFSET = 0.015
DB_RANGE = (-35.0, 15.0)


TRANSFORMS = ("log", "raw")


def transform(
    values: np.ndarray, kinds: Sequence[str], *, axis: int = 0, kind: str = "log"
) -> np.ndarray:
    """Turn composite values into features, band by band.

    Parameters
    ----------
    values
        Composite values with the band axis at ``axis`` (``(band, y, x)`` tiles use 0,
        ``(pixel, band)`` samples use -1). NaN stays NaN.
    kinds
        Kind of each band: ``reflectance``, ``backscatter_db`` or ``radiance``.
    axis
        The band axis.
    kind
        ``"log"`` or ``"raw"`` (module docstring).

    Returns
    -------
    numpy.ndarray
        float32 features, same shape.
    """
    values = np.asarray(values, dtype=np.float32)
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown feature transform {kind!r}; expected one of {TRANSFORMS}")
    if values.shape[axis] != len(kinds):
        raise ValueError(f"{values.shape[axis]} bands but {len(kinds)} kinds given")
    out = np.empty_like(values)
    v = np.moveaxis(values, axis, 0)
    o = np.moveaxis(out, axis, 0)
    # in place, band by band: no temporaries (each would be a fresh, page-faulting
    # allocation on a dask worker, whose malloc returns freed memory at once)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(len(kinds)):
            band = kinds[i]
            if band == BACKSCATTER:
                np.clip(v[i], *DB_RANGE, out=o[i])
            elif band not in (REFLECTANCE, RADIANCE):
                raise ValueError(f"unknown band kind {band!r}")
            elif kind == "raw":
                o[i] = v[i]
            elif band == REFLECTANCE:
                np.maximum(v[i], 0.0, out=o[i])
                o[i] += np.float32(REFLECTANCE_OFFSET)
                np.log(o[i], out=o[i])
            else:
                np.maximum(v[i], 0.0, out=o[i])
                np.log1p(o[i], out=o[i])
    return out
