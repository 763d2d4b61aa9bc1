"""Pixel covariates that let a cluster's density vary with what surrounds it.

The regression stays additive over pixels: a pixel of cluster ``k`` holds

    (density_k + Σ_m density_{m,k} · covariate_m(pixel)) / cell_px²

persons, so the cell estimate is ``Σ_k fraction_k · density_k + Σ_m Σ_k wfraction_{m,k} ·
density_{m,k}``, where ``wfraction_{m,k}`` is the mean over the cell of ``[label = k] ·
covariate_m``: a linear, non-negative fit on more columns (`weighted_fractions`), and the sum of
a cell's pixels is still exactly its estimate. Each covariate lies in ``[0, 1]``, so with
non-negative densities no pixel is ever negative.

Two covariates (``regression.terms``):

``intensity``
    Night lights × radar brightness: ``lights · radar`` with ``lights = log1p(radiance) /
    log1p(100)`` and ``radar`` the mean of the backscatter bands mapped from −25…+5 dB to 0…1
    (each clipped to [0, 1], missing values 0). Bright double-bounce under bright lights is
    where buildings are tall and dense: the dense cores that the clusters, made mostly of
    reflectance, confuse with lighter built-up land.
``context``
    How populated the neighbourhood is: a first ("pilot") fit's densities painted on the labels
    and smoothed with a Gaussian of ``context_radius`` metres, divided by the largest pilot
    density, then saturated by ``log1p(a c) / log1p(a)`` (`saturate`, ``a = 20``). A house
    among houses holds more people than the same roof among fields; with the saturation, a
    neighbourhood a tenth as populated as the densest already gets a third of the full
    context, so the term separates the empty from the lived-in more than the dense from the
    densest.

Whether each term is worth its columns is the accuracy protocol's call (benchmarks/README.md,
"Accuracy protocol"; the default ``regression.terms`` follows it).

All functions are pure NumPy on tiles (no I/O); the pipeline feeds them windows with a halo
of `context_halo` pixels so tile-by-tile equals whole-region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from popdask.composite import BACKSCATTER, RADIANCE
from popdask.regression import cell_cluster_index

TERMS = ("intensity", "context")
LIGHTS_SATURATION = 100.0  # nW cm-2 sr-1: log1p scaled so that this radiance maps to 1
DB_RANGE = (-25.0, 5.0)  # backscatter mapped linearly to 0…1 over this range
TRUNCATE = 4.0  # Gaussian kernel radius in sigmas
CONTEXT_SATURATION = 20.0  # context mapped by log1p(a c) / log1p(a): concave, 0 → 0, 1 → 1


def intensity_bands(kinds: Sequence[str]) -> tuple[list[int], list[int]]:
    """Indices of the night-light (radiance) and radar (backscatter) bands among ``kinds``."""
    lights = [i for i, k in enumerate(kinds) if k == RADIANCE]
    radar = [i for i, k in enumerate(kinds) if k == BACKSCATTER]
    return lights, radar


def intensity(lights: np.ndarray | None, radar: np.ndarray | None) -> np.ndarray:
    """Night lights × radar brightness per pixel, in [0, 1].

    Parameters
    ----------
    lights : ndarray, shape (n_lights, y, x), optional
        Radiance composites (nW cm⁻² sr⁻¹); their mean is used. None: the factor is left out.
    radar : ndarray, shape (n_radar, y, x), optional
        Backscatter composites in dB; their mapped values are averaged. None: left out.

    Returns
    -------
    numpy.ndarray, shape (y, x), float32
        The product of the factors given; NaN inputs count as 0.

    Raises
    ------
    ValueError
        If neither factor is given.
    """
    if lights is None and radar is None:
        raise ValueError("intensity needs night lights, radar or both")
    # band by band into one buffer each (no full-stack temporaries)
    out = None
    if lights is not None:
        lights = np.asarray(lights, np.float32)
        out = np.zeros(lights.shape[1:], np.float32)
        for band in lights:
            np.add(out, band, out=out, where=~np.isnan(band))  # NaN counts as 0
        out /= np.float32(len(lights))
        np.maximum(out, 0.0, out=out)
        np.log1p(out, out=out)
        out /= np.float32(math.log1p(LIGHTS_SATURATION))
        np.minimum(out, 1.0, out=out)
    if radar is not None:
        lo, hi = DB_RANGE
        radar = np.asarray(radar, np.float32)
        r, tmp = np.zeros(radar.shape[1:], np.float32), np.empty(radar.shape[1:], np.float32)
        for band in radar:
            np.subtract(band, np.float32(lo), out=tmp)
            tmp /= np.float32(hi - lo)
            np.fmax(tmp, 0.0, out=tmp)  # NaN → 0
            np.minimum(tmp, 1.0, out=tmp)
            r += tmp
        r /= np.float32(len(radar))
        out = r if out is None else np.multiply(out, r, out=out)
    return out


def context_sigma_px(radius_m: float, resolution: float) -> float:
    """Gaussian sigma in pixels for a context radius in metres."""
    return float(radius_m) / float(resolution)


def context_halo(sigma_px: float) -> int:
    """Pixels of halo a tile needs for its context: the kernel radius."""
    if sigma_px <= 0:
        return 0
    return math.ceil(TRUNCATE * sigma_px)


def context(labels: np.ndarray, pilot: np.ndarray, sigma_px: float) -> np.ndarray:
    """How populated each pixel's neighbourhood is, in [0, 1].

    Parameters
    ----------
    labels : ndarray, shape (y, x), integer
        Cluster labels, -1 where no data (counted as empty).
    pilot : ndarray, shape (n_clusters,)
        Non-negative densities of a fit on the cluster fractions alone.
    sigma_px : float
        Gaussian sigma in pixels (the window is mirrored at its edges).

    Returns
    -------
    numpy.ndarray, shape (y, x), float32
        ``gaussian(pilot[label]) / max(pilot)``; zeros when every pilot density is 0.
    """
    pilot = np.asarray(pilot, np.float64)
    top = float(pilot.max()) if pilot.size else 0.0
    if top <= 0:
        return np.zeros(np.shape(labels), np.float32)
    lut = np.append(pilot / top, 0.0).astype(np.float32)
    lab = np.asarray(labels)
    painted = lut[np.where(lab < 0, len(lut) - 1, lab)]
    out = painted  # a new array (fancy indexing), so it can be worked on in place
    if sigma_px > 0:
        out = gaussian_filter(painted, sigma=sigma_px, mode="mirror", truncate=TRUNCATE)
    return saturate(np.clip(out, 0.0, 1.0, out=out), out=out)


def saturate(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The context's response ``log1p(a · c) / log1p(a)`` (``a = CONTEXT_SATURATION``).

    Concave and increasing on [0, 1] with 0 → 0 and 1 → 1: a neighbourhood a twentieth as
    populated as the densest already gets 0.23 of the full context, one a quarter as
    populated 0.59.
    """
    a = np.float32(CONTEXT_SATURATION)
    out = np.multiply(values, a, out=out)
    np.log1p(out, out=out)
    out /= np.log1p(a)
    return out


def weighted_fractions(
    labels: np.ndarray,
    weights: np.ndarray,
    n_clusters: int,
    cell_px: int,
    *,
    bins: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Mean over each cell of ``[label = k] · weight`` for every cluster and weight layer.

    Parameters
    ----------
    labels : ndarray, shape (y, x), integer
        Cluster labels, -1 where no data; ``y`` and ``x`` multiples of ``cell_px``.
    weights : ndarray, shape (n_terms, y, x)
        Covariates (NaN counts as 0).
    n_clusters, cell_px : int
    bins : tuple of ndarray, optional
        ``regression.cell_cluster_index(labels, n_clusters, cell_px)`` if already computed.

    Returns
    -------
    numpy.ndarray, shape (y // cell_px, x // cell_px, n_terms * n_clusters), float32
        Term ``m``'s columns are ``m * n_clusters … (m + 1) * n_clusters - 1``.
    """
    lab = np.asarray(labels)
    w = np.asarray(weights)
    if w.ndim != 3 or w.shape[1:] != lab.shape:
        raise ValueError(f"weights {w.shape} do not match labels {lab.shape} as (terms, y, x)")
    ny, nx = lab.shape[0] // cell_px, lab.shape[1] // cell_px
    index, valid = cell_cluster_index(lab, n_clusters, cell_px) if bins is None else bins
    out = np.empty((ny, nx, w.shape[0] * n_clusters), np.float32)
    for m in range(w.shape[0]):
        values = w[m][valid]  # a copy
        values[np.isnan(values)] = 0.0
        sums = np.bincount(index, weights=values, minlength=ny * nx * n_clusters)
        out[..., m * n_clusters : (m + 1) * n_clusters] = sums.reshape(ny, nx, n_clusters)
    out /= np.float32(cell_px * cell_px)
    return out


def pixel_terms(
    names: Sequence[str],
    *,
    labels: np.ndarray,
    lights: np.ndarray | None,
    radar: np.ndarray | None,
    pilot: np.ndarray | None,
    sigma_px: float,
    scale: Sequence[float] | None = None,
) -> np.ndarray:
    """The covariates ``names`` of one window, stacked ``(n_terms, y, x)`` float32.

    ``scale`` divides each layer (the run uses the largest value each term takes in the
    region, so every term spans [0, 1]: the ridge penalty of the fit then treats them alike).
    """
    layers = []
    for name in names:
        if name == "intensity":
            layers.append(intensity(lights, radar))
        elif name == "context":
            if pilot is None:
                raise ValueError("the context term needs the pilot densities")
            layers.append(context(labels, pilot, sigma_px))
        else:
            raise ValueError(f"unknown term {name!r}; expected one of {TERMS}")
    if not layers:
        return np.zeros((0, *np.shape(labels)), np.float32)
    out = np.stack(layers)
    if scale is not None:
        out /= np.asarray(scale, np.float32)[:, None, None]
    return out
