"""The pixel model: features, standardise, PCA, k-means — fitted on a sample, kept as arrays.

:func:`fit_model` fits on a sample of composite pixels drawn across the whole region
(:func:`sample_tile` draws one tile's share). Its defaults are the plain method's: raw
features, 12 unwhitened PCA components (dask-ml IncrementalPCA), full-batch k-means with 30
clusters. The accuracy protocol tried the log transform, whitening, dask-ml's mini-batch
k-means, 6 components and 100 clusters one at a time on four generated regions: none beat
it by more than the spread of the k-means seeds (whitening and mini-batch lost on every
region; the log transform gained on the lowland demo and lost badly in a valley), so they
are options (``model.features``, ``model.whiten``, ``model.kmeans``).

The fitted :class:`PixelModel` is nothing but NumPy arrays and band names:
:meth:`PixelModel.to_arrays` / :meth:`PixelModel.from_arrays` store and restore it without
pickle, and :meth:`PixelModel.labels` assigns clusters to a
tile with two matrix products (no per-pixel Python).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from popdask.composite import REFLECTANCE
from popdask.features import transform

log = logging.getLogger(__name__)

NODATA_LABEL = -1
BLOCK_PIXELS = 16_384  # pixels per distance block in `PixelModel.labels`


@dataclass(frozen=True)
class PixelModel:
    """A fitted feature transform, PCA and k-means, as plain arrays."""

    bands: tuple[str, ...]
    kinds: tuple[str, ...]
    mean: np.ndarray  # (n_features,) feature means
    std: np.ndarray  # (n_features,) feature standard deviations
    components: np.ndarray  # (n_components, n_features) PCA axes (standardised space)
    pca_mean: np.ndarray  # (n_features,)
    explained_variance: np.ndarray  # (n_components,)
    centroids: np.ndarray  # (n_clusters, n_components) in (whitened) PCA space
    whiten: bool = True  # PCA scores divided by their standard deviation before k-means
    transform: str = "log"  # the feature transform (popdask.features)

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def required(self) -> np.ndarray:
        """Bands a pixel must have to be labelled (the reflectances); others are imputed."""
        return np.array([k == REFLECTANCE for k in self.kinds])

    # -- projection ---------------------------------------------------------------------
    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Standardise → PCA → whiten folded into ``p = x @ w + b``, and the k-means
        distance folded into ``x @ a + c`` (= ``||p − centroid||² − ||p||²``), float32."""
        ev = self.explained_variance
        scale = 1.0 / np.sqrt(ev) if self.whiten else np.ones_like(ev)
        w = (self.components / self.std).T * scale  # (n_features, n_components)
        b = -((self.mean / self.std + self.pca_mean) @ self.components.T) * scale
        cen = self.centroids
        a = -2.0 * (w @ cen.T)  # (n_features, n_clusters)
        c = (cen * cen).sum(axis=1) - 2.0 * (b @ cen.T)
        return tuple(v.astype(np.float32) for v in (w, b, a, c))

    def _features(self, values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Features with missing radar/lights imputed by the mean, and which pixels are valid."""
        x = transform(values, self.kinds, axis=axis, kind=self.transform)
        xb = np.moveaxis(x, axis, 0)
        valid = np.isfinite(xb[self.required]).all(axis=0)
        mean = self.mean.astype(np.float32).reshape((-1,) + (1,) * (xb.ndim - 1))
        np.copyto(xb, np.broadcast_to(mean, xb.shape), where=~np.isfinite(xb))
        return x, valid

    def project(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whitened PCA scores of ``(n, band)`` composite values, and which rows are valid."""
        x, valid = self._features(values, axis=-1)
        w, b, _, _ = self._affine
        return x @ w + b, valid

    def predict(self, values: np.ndarray) -> np.ndarray:
        """Cluster of each ``(n, band)`` row, -1 where a reflectance is missing."""
        x, valid = self._features(values, axis=-1)
        _, _, a, c = self._affine
        # argmin ||p - c||² = argmin (||c||² - 2 p·c), all folded into one BLAS product.
        lab = np.argmin(x @ a + c, axis=1).astype(np.int16)
        lab[~valid] = NODATA_LABEL
        return lab

    def labels(self, composite: np.ndarray) -> np.ndarray:
        """Cluster labels ``(y, x)`` int16 of a ``(band, y, x)`` composite tile."""
        nb, ny, nx = composite.shape
        if nb != len(self.bands):
            raise ValueError(f"composite has {nb} bands, the model expects {len(self.bands)}")
        x, valid = self._features(composite, axis=0)  # band-major: contiguous per band
        x = x.reshape(nb, -1)
        _, _, a, c = self._affine
        n = x.shape[1]
        lab = np.empty(n, np.int16)
        # blocks that stay in cache (2× faster), through buffers made once per tile
        step = min(BLOCK_PIXELS, n)
        xb, d = np.empty((step, nb), np.float32), np.empty((step, len(c)), np.float32)
        best = np.empty(step, np.intp)
        for i in range(0, n, step):
            m = min(step, n - i)
            xb[:m] = x[:, i : i + m].T
            np.matmul(xb[:m], a, out=d[:m])
            d[:m] += c
            np.argmin(d[:m], axis=1, out=best[:m])
            lab[i : i + m] = best[:m]
        lab[~valid.ravel()] = NODATA_LABEL
        return lab.reshape(ny, nx)

    # -- plain-array storage ------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """``(arrays, attrs)``: everything needed to rebuild the model, no pickle."""
        arrays = {
            k: np.asarray(getattr(self, k), dtype=np.float64)
            for k in ("mean", "std", "components", "pca_mean", "explained_variance", "centroids")
        }
        return arrays, {
            "bands": list(self.bands),
            "kinds": list(self.kinds),
            "whiten": bool(self.whiten),
            "transform": self.transform,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], attrs: dict) -> PixelModel:
        """Rebuild a model saved by :meth:`to_arrays`."""
        missing = {"mean", "std", "components", "pca_mean", "explained_variance", "centroids"}
        missing -= set(arrays)
        if missing:
            raise ValueError(f"saved model lacks arrays {sorted(missing)}; re-run the fit pass")
        return cls(
            bands=tuple(attrs["bands"]),
            kinds=tuple(attrs["kinds"]),
            # stores of earlier versions: log features, always whitened
            whiten=bool(attrs.get("whiten", True)),
            transform=str(attrs.get("transform", "log")),
            **{k: np.asarray(v) for k, v in arrays.items() if k in cls.__dataclass_fields__},
        )

    def summary(self) -> dict:
        """Small JSON-able description for the store's attrs and the log."""
        ev = self.explained_variance
        return {
            "bands": list(self.bands),
            "components": int(self.components.shape[0]),
            "clusters": self.n_clusters,
            "whiten": bool(self.whiten),
            "explained_variance_ratio": float(ev.sum() / max(self.std.size, 1)),
        }


def sample_tile(
    composite: np.ndarray, n: int, seed: int, required: np.ndarray | None = None
) -> np.ndarray:
    """Draw up to ``n`` random pixels ``(n, band)`` with all ``required`` bands present.

    ``required`` marks the bands a pixel needs (the reflectances: :func:`fit_model` keeps
    only such pixels, so drawing others would shrink the sample); default every band.
    Pure; ``seed`` should differ per tile so tiles draw independent samples.
    """
    nb = composite.shape[0]
    flat = composite.reshape(nb, -1)
    need = np.ones(nb, bool) if required is None else np.asarray(required, bool)
    ok = np.flatnonzero(np.isfinite(flat[need]).all(axis=0))
    if ok.size == 0 or n <= 0:
        return np.empty((0, nb), np.float32)
    rng = np.random.default_rng(seed)
    pick = rng.choice(ok, size=min(n, ok.size), replace=False)
    return flat[:, np.sort(pick)].T.astype(np.float32)


def _fit_pca(z: np.ndarray, n_comp: int, block_rows: int):
    """dask-ml IncrementalPCA on the standardised sample: (components, mean, variance)."""
    from dask_ml.decomposition import IncrementalPCA

    pca = IncrementalPCA(n_components=n_comp, whiten=False, batch_size=block_rows)
    with warnings.catch_warnings():
        # dask-ml divides 0/0 for the noise variance when all components are kept
        warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        pca.fit(da.from_array(z, chunks=(block_rows, -1), name=False))
    return (
        np.asarray(pca.components_, dtype=np.float64),
        np.asarray(pca.mean_, dtype=np.float64),
        np.asarray(pca.explained_variance_, dtype=np.float64),
    )


def _fit_kmeans(p: np.ndarray, clusters: int, *, seed: int, block_rows: int, epochs: int):
    """Mini-batch k-means over dask blocks (dask-ml ``Incremental``): the centroids.

    Chosen over ``dask_ml.cluster.KMeans`` by ``benchmarks/kmeans.py``.
    """
    from dask_ml.wrappers import Incremental
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    km = Incremental(
        MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, reassignment_ratio=0.01),
        shuffle_blocks=True,
        random_state=seed,
    )
    for _ in range(epochs):  # ``name=False``: no hashing of the sample to name it
        rows = rng.permutation(p.shape[0])
        km.partial_fit(da.from_array(p[rows], chunks=(block_rows, -1), name=False))
    return np.asarray(km.estimator_.cluster_centers_, dtype=np.float64)


def _fit_lloyd(p: np.ndarray, clusters: int, *, seed: int) -> np.ndarray:
    """Full-batch (Lloyd) k-means of scikit-learn on the in-memory sample: the centroids."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(p)
    return np.asarray(km.cluster_centers_, dtype=np.float64)


def fit_model(
    samples: np.ndarray,
    bands: Sequence[str],
    kinds: Sequence[str],
    *,
    components: int = 12,
    clusters: int = 30,
    seed: int = 0,
    whiten: bool = False,
    kmeans: str = "lloyd",
    features: str = "raw",
    block_rows: int = 50_000,
    epochs: int = 3,
) -> PixelModel:
    """Fit the feature transform, standardisation, IncrementalPCA and k-means on a pixel sample.

    Parameters
    ----------
    samples
        ``(n, band)`` composite values drawn across the region.
    bands, kinds
        Band names and kinds (see :mod:`popdask.features`).
    components
        PCA components (capped at the number of bands).
    clusters
        k-means clusters.
    seed
        Random state of the k-means.
    whiten
        Divide the PCA scores by their standard deviation before the k-means (every
        component then weighs alike in the distances, the noisy last ones too).
    kmeans
        ``"lloyd"``: scikit-learn's full-batch k-means on the sample; ``"minibatch"``:
        dask-ml ``Incremental(MiniBatchKMeans)`` over blocks of it (``epochs`` passes).
    features
        The feature transform, ``"log"`` or ``"raw"`` (:mod:`popdask.features`).
    block_rows
        Rows per dask block (one mini-batch of the k-means per block and epoch).
    epochs
        Passes of mini-batch k-means over the sample.

    Returns
    -------
    PixelModel
    """
    kinds = tuple(kinds)
    x = transform(np.ascontiguousarray(samples.T), kinds, axis=0, kind=features).T
    required = np.array([k == REFLECTANCE for k in kinds])
    x = x[np.isfinite(x[:, required]).all(axis=1)]
    if x.shape[0] < max(clusters * 10, 1000):
        raise ValueError(
            f"only {x.shape[0]} valid pixels to fit {clusters} clusters; raise "
            "model.sample_pixels or check that the composites are not empty (clouds, assets)"
        )
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    std[~(std > 1e-6)] = 1.0
    z = (x - mean) / std
    z[~np.isfinite(z)] = 0.0
    z = z.astype(np.float64)
    n_comp = min(components, z.shape[1])
    # The sample already sits in this process: fit it here rather than ship it to the
    # cluster (it is small; the region never has to fit in memory). Synchronously: each of
    # dask-ml's steps is a chain of small blocks, which a thread pool only adds hand-offs
    # to (the same model bit for bit; benchmarks/README.md).
    with dask.config.set(scheduler="sync"):
        comps, pmean, ev = _fit_pca(z, n_comp, block_rows)
        p = (z - pmean) @ comps.T
        if whiten:
            p /= np.sqrt(ev)
        if kmeans == "lloyd":
            centroids = _fit_lloyd(p, clusters, seed=seed)
        elif kmeans == "minibatch":
            centroids = _fit_kmeans(p, clusters, seed=seed, block_rows=block_rows, epochs=epochs)
        else:
            raise ValueError(f"kmeans must be 'lloyd' or 'minibatch', got {kmeans!r}")
    model = PixelModel(
        bands=tuple(bands),
        kinds=kinds,
        mean=mean,
        std=std,
        components=comps,
        pca_mean=pmean,
        explained_variance=ev,
        centroids=centroids,
        whiten=bool(whiten),
        transform=features,
    )
    log.info(
        "model: %d pixels, %d features -> %d components (%.0f %% variance) -> %d clusters",
        x.shape[0],
        x.shape[1],
        n_comp,
        100 * ev.sum() / z.shape[1],
        clusters,
    )
    return model
