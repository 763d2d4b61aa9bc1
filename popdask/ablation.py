"""The ablation of the accuracy protocol: from the plain method up, one refinement at a time.

A region's composite, census and truth come from a finished run (its store); the downstream
steps are redone here in-process for every variant, so the expensive composite is made once
per region. A variant is a dict of settings (`PLAIN` and the `VARIANTS` built on it):

``transform``  ``"raw"`` (composite values) or ``"log"`` (`popdask.features.transform`)
``whiten``     divide the PCA scores by their standard deviation
``kmeans``     ``"lloyd"`` (scikit-learn KMeans) or ``"minibatch"`` (popdask's dask-ml fit)
``components``, ``clusters``
``fit``        ``"nnls"`` (plain non-negative least squares), ``"ridge"`` (ridge NNLS
               committee) or ``"poisson"`` (the quasi-Poisson committee; both
               `regression.fit_densities`)
``terms``      covariates (`popdask.terms`): ``intensity``, ``context``; ``saturate`` False
               gives the linear context

Each variant is scored, for several k-means seeds, at 1 km (repeated grouped cross-validation
over 5 km blocks, `popdask.protocol`) and against the truth at 100 m and 20 m, of the rescaled
population (what the store's ``population`` holds) and of its smoothing (σ = 3 px, the
store's ``density``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popdask import predict, protocol, regression, terms
from popdask.composite import REFLECTANCE
from popdask.features import transform as log_transform

CELL_PX = 50
BLOCK_CELLS = 5  # 5 km blocks: the groups of the 1 km cross-validation
SAMPLE = 200_000
SIGMA_SMOOTH = 3.0
CONTEXT_SIGMA_PX = 10.0  # 200 m at 20 m

#: The plain method: median composite → standardise → PCA → k-means 30 → NNLS → rescale.
PLAIN: dict[str, Any] = {
    "transform": "raw",
    "whiten": False,
    "kmeans": "lloyd",
    "components": 12,
    "clusters": 30,
    "fit": "nnls",
    "terms": (),
    "saturate": True,
}

#: popdask's defaults before the protocol (model 12 × 150 in the config, 100 in the demo).
POPDASK_BEFORE: dict[str, Any] = {
    "transform": "log",
    "whiten": True,
    "kmeans": "minibatch",
    "components": 12,
    "clusters": 100,
    "fit": "poisson",
    "terms": ("intensity", "context"),
    "saturate": True,
}


def _v(**kw) -> dict[str, Any]:
    return {**PLAIN, **kw}


#: Name → settings: each refinement added to the plain method alone, then popdask's stack.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": PLAIN,
    "+ log transform": _v(transform="log"),
    "+ whitening": _v(whiten=True),
    "+ mini-batch k-means": _v(kmeans="minibatch"),
    "k = 100": _v(clusters=100),
    "6 components": _v(components=6),
    "+ quasi-Poisson": _v(fit="poisson"),
    "+ ridge NNLS committee": _v(fit="ridge"),
    "+ densities bounded": _v(fit="bounded"),
    "+ intensity": _v(terms=("intensity",)),
    "+ context": _v(terms=("context",)),
    "+ context, linear": _v(terms=("context",), saturate=False),
    "popdask model, NNLS": {**POPDASK_BEFORE, "fit": "nnls", "terms": ()},
    "popdask, no terms": {**POPDASK_BEFORE, "terms": ()},
    "popdask before": POPDASK_BEFORE,
}
#: Combinations of the refinements that won alone (the third round).
COMBINED: dict[str, dict[str, Any]] = {
    "+ intensity, k = 100, quasi-Poisson": _v(terms=("intensity",), clusters=100, fit="poisson"),
    "k = 100, quasi-Poisson": _v(clusters=100, fit="poisson"),
}

#: The plain method with the log transform, which wins on every region: the base of the
#: second round, each refinement again added alone.
LOG: dict[str, Any] = {**PLAIN, "transform": "log"}
VARIANTS.update(
    {
        f"log {name}": {**settings, "transform": "log"}
        for name, settings in VARIANTS.items()
        if name.startswith(("+", "k =", "6 ")) and name != "+ log transform"
    }
)


@dataclass
class Region:
    """What the ablation needs of a finished run."""

    name: str
    composite: np.ndarray  # (band, y, x) float32
    kinds: list[str]
    census: np.ndarray  # (y_cell, x_cell), NaN unknown
    truth: np.ndarray  # (y, x) persons per pixel


def load_region(run_dir: str | Path, name: str | None = None) -> Region:
    """The composite, census and truth of a run made by `prepare` (or ``popdask demo``)."""
    import rasterio

    from popdask import store

    run_dir = Path(run_dir)
    path = str(run_dir / "popdask-demo.zarr")
    ds = store.open_store(path)
    with rasterio.open(run_dir / "data" / "truth.tif") as src:
        truth = src.read(1).astype(np.float64)
    return Region(
        name=name or run_dir.name,
        composite=np.asarray(ds["composite"].values, np.float32),
        kinds=store.band_kinds(path),
        census=np.asarray(ds["census"].values, np.float64),
        truth=truth,
    )


def prepare(kind: str, seed: int, out: str | Path, size_km: int = 20) -> Path:
    """Generate a region (``demo`` or ``valley``) and run popdask's pipeline on it once.

    The run's store keeps the composite the ablation reuses. Returns the run folder.
    """
    out = Path(out)
    if (out / "metrics.json").exists():
        return out
    if kind == "demo":
        from popdask.demo import run_demo

        run_demo(out, size_km=size_km, seed=seed, progress=False)
        return out
    from popdask.config import config_from_dict
    from popdask.demo import read_truth
    from popdask.pipeline import run
    from popdask.stac_server import StacServer
    from popdask.valley import VALLEY_BBOX, make_valley_region, valley_config

    x0, y0 = VALLEY_BBOX[:2]
    bbox = (x0, y0, x0 + size_km * 1000, y0 + size_km * 1000)
    region = make_valley_region(out / "data", bbox=bbox, seed=seed)
    with StacServer(list(region.collections.values()), list(region.items.values())) as server:
        cfg = valley_config(region, server.url, out / "popdask-demo.zarr")
        run(
            config_from_dict(cfg, name="valley"),
            progress=False,
            truth=read_truth(region),
            report_dir=out,
        )
    return out


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _features(region: Region, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(n_pixels, band)`` features and the pixels with every reflectance."""
    comp = region.composite
    x = log_transform(comp, region.kinds, axis=0) if kind == "log" else comp.copy()
    x = x.reshape(len(region.kinds), -1).T
    required = np.array([k == REFLECTANCE for k in region.kinds])
    valid = np.isfinite(x[:, required]).all(axis=1)
    return x, valid


def labels(region: Region, settings: dict, seed: int, cache: dict | None = None) -> np.ndarray:
    """Cluster labels ``(y, x)`` (-1 no data) of a region for the model settings."""
    key = tuple(settings[k] for k in ("transform", "whiten", "kmeans", "components", "clusters"))
    key = (*key, seed)
    if cache is not None and key in cache:
        return cache[key]
    x, valid = _features(region, settings["transform"])
    rng = np.random.default_rng(1000 + seed)
    ok = np.flatnonzero(valid)
    sample = x[rng.choice(ok, size=min(SAMPLE, ok.size), replace=False)]
    mean = np.nanmean(sample, axis=0)
    std = np.nanstd(sample, axis=0)
    std[~(std > 1e-6)] = 1.0
    z = (sample - mean) / std
    z[~np.isfinite(z)] = 0.0
    from sklearn.decomposition import PCA

    pca = PCA(n_components=min(settings["components"], z.shape[1]), random_state=0).fit(z)
    scale = np.sqrt(pca.explained_variance_) if settings["whiten"] else 1.0
    p = pca.transform(z) / scale
    k = settings["clusters"]
    if settings["kmeans"] == "minibatch":
        import dask

        from popdask.model import _fit_kmeans

        with dask.config.set(scheduler="sync"):
            centroids = _fit_kmeans(p, k, seed=seed, block_rows=50_000, epochs=3)
    else:
        from sklearn.cluster import KMeans

        centroids = KMeans(k, n_init=1, random_state=seed).fit(p).cluster_centers_
    lab = np.full(x.shape[0], -1, np.int16)
    c2 = (centroids**2).sum(axis=1)
    for i in range(0, ok.size, 200_000):
        rows = ok[i : i + 200_000]
        z = (x[rows] - mean) / std
        z[~np.isfinite(z)] = 0.0
        q = pca.transform(z) / scale
        lab[rows] = np.argmin(c2 - 2 * q @ centroids.T, axis=1)
    out = lab.reshape(region.composite.shape[1:])
    if cache is not None:
        cache[key] = out
    return out


# --------------------------------------------------------------------------------------------
# Design, fit, scores
# --------------------------------------------------------------------------------------------


def _context(lab: np.ndarray, pilot: np.ndarray, saturate: bool) -> np.ndarray:
    if saturate:
        return terms.context(lab, pilot, CONTEXT_SIGMA_PX)
    from scipy.ndimage import gaussian_filter

    top = float(pilot.max()) if pilot.max() > 0 else 1.0
    painted = np.append(pilot / top, 0.0).astype(np.float32)[np.where(lab < 0, len(pilot), lab)]
    return np.clip(gaussian_filter(painted, CONTEXT_SIGMA_PX, truncate=terms.TRUNCATE), 0, 1)


class Design:
    """A variant's cell design on one region: fractions, and the term columns for a pilot."""

    def __init__(self, region: Region, lab: np.ndarray, settings: dict):
        self.region, self.lab, self.s = region, lab, settings
        self.k = settings["clusters"]
        f = regression.cell_fractions(lab, self.k, cell_px=CELL_PX)
        self.F = f.reshape(-1, self.k).astype(np.float64)
        y = region.census.ravel().copy()
        y[self.F.sum(axis=1) < 0.5] = np.nan  # the run's regression.min_valid
        self.y = y
        self.known = np.isfinite(y) & (y >= 0)
        self.groups = regression.block_groups(region.census.shape, BLOCK_CELLS).ravel()
        self.bins = regression.cell_cluster_index(lab, self.k, CELL_PX)
        self.intensity = None
        if "intensity" in settings["terms"]:
            lights, radar = terms.intensity_bands(region.kinds)
            comp = region.composite
            layer = terms.intensity(
                comp[lights] if lights else None, comp[radar] if radar else None
            )
            self.intensity = layer / max(float(layer.max()), 1e-12)

    def fit(self, x: np.ndarray, train: np.ndarray) -> np.ndarray:
        t = train & self.known
        if self.s["fit"] == "nnls":
            return protocol.nnls_densities(x[t], self.y[t])
        if self.s["fit"] == "bounded":  # NNLS with every density ≤ the densest known cell
            return protocol.bounded_densities(x[t], self.y[t])
        if self.s["fit"] == "ridge":  # ridge NNLS, strength by inner grouped CV (a committee)
            return regression.fit_densities(
                x[t], self.y[t], self.groups[t], loss="squared", alpha=None
            )
        return regression.fit_densities(x[t], self.y[t], self.groups[t])

    def layers(self, train: np.ndarray) -> np.ndarray | None:
        """The term layers ``(m, y, x)`` for a fit on ``train`` cells (None without terms)."""
        out = []
        for name in self.s["terms"]:
            if name == "intensity":
                out.append(self.intensity)
            else:
                pilot = self.fit(self.F, train)
                c = _context(self.lab, pilot, self.s["saturate"])
                out.append(c / max(float(c.max()), 1e-12))
        return np.stack(out).astype(np.float32) if out else None

    def design(self, layers: np.ndarray | None) -> np.ndarray:
        if layers is None:
            return self.F
        w = terms.weighted_fractions(self.lab, layers, self.k, CELL_PX, bins=self.bins)
        return np.hstack([self.F, w.reshape(self.F.shape[0], -1).astype(np.float64)])

    def method(self, train: np.ndarray) -> np.ndarray:
        """Cell predictions of a fit on ``train`` (for `protocol.cross_predict`)."""
        x = self.design(self.layers(train))
        return x @ self.fit(x, train)

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Rescaled persons per pixel of a fit on every known cell, and its smoothing."""
        everything = np.ones(len(self.y), bool)
        layers = self.layers(everything)
        dens = self.fit(self.design(layers), everything)
        pop = predict.pixel_population(self.lab, dens, CELL_PX, layers)
        pop = predict.rescale(pop, self.region.census, CELL_PX)
        return pop, predict.smooth(pop, SIGMA_SMOOTH)


def truth_scores(pop: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """R² at 20 m, 100 m and 1 km against the truth."""
    out = {}
    for px, name in ((1, "20m"), (5, "100m"), (50, "1km")):
        a = predict.cell_sums(pop, px).ravel() if px > 1 else pop.ravel()
        b = predict.cell_sums(truth, px).ravel() if px > 1 else truth.ravel()
        out[name] = regression.scores(b, a)["r2"]
    return out


def score_variant(
    region: Region, settings: dict, seeds: Sequence[int], repeats: int, cache: dict | None = None
) -> dict[str, Any]:
    """One variant on one region: per seed, 1 km CV (mean over the repeats) and truth R²."""
    rows = []
    for seed in seeds:
        lab = labels(region, settings, seed, cache)
        d = Design(region, lab, settings)
        idx = np.flatnonzero(d.known)
        folds = np.full((repeats, len(d.y)), -1)
        folds[:, idx] = protocol.repeated_group_folds(d.groups[idx], 5, repeats, seed=seed)

        def method(train, d=d, idx=idx):
            full = np.zeros(len(d.y), bool)
            full[idx[train]] = True
            return d.method(full)[idx]

        pred = protocol.cross_predict(method, folds[:, idx])
        cv = protocol.summary(d.y[idx], pred)
        pop, smooth = d.maps()
        rows.append(
            {
                "seed": seed,
                "cv_r2": cv["r2_mean"],
                "cv_r2_sd": cv["r2_sd"],
                "cv_mae": cv["mae_mean"],
                "truth": truth_scores(pop, region.truth),
                "truth_smoothed": truth_scores(smooth, region.truth),
            }
        )
    return {"seeds": rows, **_means(rows)}


def _means(rows: list[dict]) -> dict[str, float]:
    def col(f):
        return np.array([f(r) for r in rows])

    out = {}
    for name, f in (
        ("cv_r2", lambda r: r["cv_r2"]),
        ("cv_mae", lambda r: r["cv_mae"]),
        ("r2_100m", lambda r: r["truth"]["100m"]),
        ("r2_20m", lambda r: r["truth"]["20m"]),
        ("r2_100m_smoothed", lambda r: r["truth_smoothed"]["100m"]),
        ("r2_20m_smoothed", lambda r: r["truth_smoothed"]["20m"]),
    ):
        v = col(f)
        out[name] = float(v.mean())
        out[f"{name}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    # the split spread of the 1 km CV, averaged over seeds
    out["cv_r2_split_sd"] = float(col(lambda r: r["cv_r2_sd"]).mean())
    return out


REGIONS = {
    "demo-0": ("demo", 0),
    "demo-1": ("demo", 1),
    "valley-0": ("valley", 0),
    "valley-1": ("valley", 1),
}


def run_regions(
    work: str | Path,
    *,
    seeds: int = 3,
    repeats: int = 10,
    only: Sequence[str] | None = None,
    regions: Sequence[str] | None = None,
    variants: dict[str, dict] | None = None,
    report: Callable[[str], Any] = print,
    save: Callable[[dict], Any] | None = None,
) -> dict[str, Any]:
    """Every variant on every region (generated and run once in ``work``): the table.

    ``save(table)`` is called after each variant (a long run keeps what it measured).
    """
    work = Path(work)
    variants = dict(variants or {**VARIANTS, **COMBINED})
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    out: dict[str, Any] = {"seeds": seeds, "repeats": repeats, "regions": {}}
    for name in regions or list(REGIONS):
        kind, seed = REGIONS[name]
        region = load_region(prepare(kind, seed, work / name), name)
        cache: dict = {}
        res = out["regions"][name] = {}
        for vname, settings in variants.items():
            t = time.perf_counter()
            res[vname] = score_variant(region, settings, range(seeds), repeats, cache)
            res[vname]["seconds"] = time.perf_counter() - t
            r = res[vname]
            report(
                f"{name:<9} {vname:<22} 1 km CV R² {r['cv_r2']:.3f} ± {r['cv_r2_sd']:.3f} "
                f"(splits ± {r['cv_r2_split_sd']:.3f})  100 m {r['r2_100m']:.3f} ± "
                f"{r['r2_100m_sd']:.3f}  20 m {r['r2_20m']:.3f}  smoothed 100 m "
                f"{r['r2_100m_smoothed']:.3f}  ({r['seconds']:.0f} s)"
            )
            if save is not None:
                save(out)
        del region, cache
    return out


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    v = np.asarray(values, np.float64)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


__all__ = [
    "PLAIN",
    "POPDASK_BEFORE",
    "VARIANTS",
    "Design",
    "Region",
    "labels",
    "load_region",
    "prepare",
    "run_regions",
    "score_variant",
    "spread",
    "truth_scores",
]
