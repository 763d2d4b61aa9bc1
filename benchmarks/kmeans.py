"""dask_ml.cluster.KMeans against Incremental(MiniBatchKMeans), on real popdask features.

Usage::

    python benchmarks/kmeans.py STORE.zarr [--clusters 60] [--pixels 200000]

STORE is a finished popdask run (e.g. ``popdask-demo/popdask-demo.zarr`` after
``popdask demo``). Both estimators cluster the same whitened PCA features of a pixel
sample drawn from the stored composites (the model saved in the store gives the feature
transform); then every pixel of the region is labelled with each set of centroids and the
1 km fit is cross-validated on the resulting cluster fractions, which is what the choice
is for. Prints wall time, the sum of squared distances (the k-means objective) and the
1 km cross-validated R² / MAE of each.
"""

from __future__ import annotations

import argparse
import time

import dask
import dask.array as da
import numpy as np

from popdask import regression, store
from popdask.grid import Grid
from popdask.model import PixelModel
from popdask.pipeline import cv_groups


def sse(p: np.ndarray, centroids: np.ndarray) -> float:
    d = (centroids**2).sum(1) - 2 * p @ centroids.T + (p**2).sum(1)[:, None]
    return float(d.min(axis=1).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--clusters", type=int, default=None)
    ap.add_argument("--pixels", type=int, default=200_000)
    args = ap.parse_args()

    ds = store.open_store(args.store)
    arrays, attrs = store.load_arrays(args.store, "model")
    model = PixelModel.from_arrays(arrays, attrs)
    k = args.clusters or model.n_clusters
    g = ds.attrs["popdask"]["grid"]
    grid = Grid(tuple(g["bounds"]), resolution=g["resolution"], cell=g["cell"], tile=g["tile"])
    comp = ds.composite.values
    flat = comp.reshape(comp.shape[0], -1).T
    proj, valid = model.project(flat)
    rng = np.random.default_rng(0)
    idx = rng.choice(np.flatnonzero(valid), size=min(args.pixels, int(valid.sum())), replace=False)
    sample = proj[idx].astype(np.float64)
    census = ds.census.values.reshape(-1).astype(np.float64)
    groups = cv_groups(grid).reshape(-1)
    print(
        f"{sample.shape[0]} pixels × {sample.shape[1]} components, k = {k}, "
        f"{int(np.isfinite(census).sum())} census cells"
    )

    from dask_ml.cluster import KMeans
    from dask_ml.wrappers import Incremental
    from sklearn.cluster import MiniBatchKMeans

    candidates = {
        "dask_ml KMeans(init='k-means||', oversampling_factor=2k)": lambda x: (
            KMeans(n_clusters=k, init="k-means||", oversampling_factor=2 * k, random_state=0)
            .fit(x)
            .cluster_centers_
        ),
        "Incremental(MiniBatchKMeans), 3 epochs (popdask)": None,
    }
    rows = []
    with dask.config.set(scheduler="threads"):
        for name, fit in candidates.items():
            t0 = time.perf_counter()
            if fit is None:
                inc = Incremental(
                    MiniBatchKMeans(
                        n_clusters=k, random_state=0, n_init=3, reassignment_ratio=0.01
                    ),
                    shuffle_blocks=True,
                    random_state=0,
                )
                for _ in range(3):
                    inc.partial_fit(
                        da.from_array(sample[rng.permutation(len(sample))], chunks=(50_000, -1))
                    )
                centroids = np.asarray(inc.estimator_.cluster_centers_)
            else:
                centroids = np.asarray(fit(da.from_array(sample, chunks=(50_000, -1))))
            seconds = time.perf_counter() - t0
            c = centroids.astype(np.float32)
            d = (c * c).sum(1) - 2 * proj @ c.T
            labels = np.where(valid, d.argmin(1), -1).reshape(grid.shape).astype(np.int16)
            fr = regression.cell_fractions(labels, k, cell_px=grid.cell_px).reshape(-1, k)
            cv = regression.cross_validate(fr.astype(np.float64), census, groups, n_splits=5)
            rows.append((name, seconds, sse(sample, centroids), cv.scores["r2"], cv.scores["mae"]))
    print(f"{'estimator':<58} {'fit s':>7} {'SSE':>12} {'1km CV R²':>10} {'CV MAE':>8}")
    for name, s, e, r2, mae in rows:
        print(f"{name:<58} {s:7.2f} {e:12.4g} {r2:10.3f} {mae:8.1f}")


if __name__ == "__main__":
    main()
