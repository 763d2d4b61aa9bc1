"""Quicklook figures of a finished run.

:func:`quicklook` draws, for a few windows of the output, a row of three panels: the
Sentinel-2 true-colour composite, the estimated people per 20 m pixel and the smoothed density
in persons/km² with the census count of each 1 km cell printed on it. :func:`scatter` draws
predicted against census counts per cell for the metrics report.

Everything here works from numpy/xarray: only the windows drawn are loaded (``.values`` on a
small selection), so a lazily opened continent-scale store is fine. Figures are built with
:class:`matplotlib.figure.Figure` on the Agg canvas; pyplot's global state is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib import patheffects as pe
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "Window",
    "choose_windows",
    "choose_windows_blockwise",
    "export_quicklook",
    "quicklook",
    "r_squared",
    "scatter",
]

#: A window: (xmin, ymin, xmax, ymax) in metres of the dataset's CRS (EPSG:3035).
Window = tuple[float, float, float, float]

_NODATA_RGB = (0.35, 0.35, 0.35)  # grey for pixels without a composite value
_MAX_LABELLED_CELLS = 30  # per axis: more cells than this and census labels are left out


# --------------------------------------------------------------------------- windows
def _cell_size(coord: np.ndarray, default: float = 1000.0) -> float:
    if coord.size < 2:
        return default
    return float(np.median(np.abs(np.diff(coord))))


def choose_windows(
    census: xr.DataArray,
    n: int = 3,
    window: float = 5000.0,
) -> list[Window]:
    """Choose up to ``n`` non-overlapping square windows over the most populated places.

    Windows are made of whole census cells (so their edges are on the 1 km grid), ``window``
    metres wide rounded up to whole cells and shrunk to the region where it is smaller. They
    are chosen greedily: the window with the largest census total first, then the largest
    among those that do not overlap any chosen one, and so on. At least one window is always
    returned, even when the census is all zero or NaN.

    Parameters
    ----------
    census : xarray.DataArray
        Census counts, dims ``(y_cell, x_cell)`` with cell-centre coordinates in metres (NaN
        counts as 0).
    n : int
        Number of windows wanted (at least 1). Fewer are returned when no more fit.
    window : float
        Window side in metres.

    Returns
    -------
    list of tuple
        ``(xmin, ymin, xmax, ymax)`` in metres, most populated first.

    Raises
    ------
    ValueError
        If ``census`` lacks the ``y_cell``/``x_cell`` dims, is empty, or ``n``/``window`` are
        not positive.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not window > 0:
        raise ValueError(f"window must be positive, got {window}")
    if set(census.dims) != {"y_cell", "x_cell"}:
        raise ValueError(f"census must have dims (y_cell, x_cell), got {census.dims}")
    census = census.transpose("y_cell", "x_cell")
    ys = np.asarray(census["y_cell"].values, dtype=float)
    xs = np.asarray(census["x_cell"].values, dtype=float)
    if ys.size == 0 or xs.size == 0:
        raise ValueError("census is empty")
    cell_y, cell_x = _cell_size(ys), _cell_size(xs)
    values = np.nan_to_num(np.asarray(census.values, dtype=float), nan=0.0)
    ny, nx = values.shape
    wy = min(ny, max(1, math.ceil(window / cell_y - 1e-9)))
    wx = min(nx, max(1, math.ceil(window / cell_x - 1e-9)))

    # Totals of every wy x wx block of cells, indexed by its first row/column.
    csum = np.zeros((ny + 1, nx + 1))
    csum[1:, 1:] = values.cumsum(0).cumsum(1)
    totals = csum[wy:, wx:] - csum[:-wy, wx:] - csum[wy:, :-wx] + csum[:-wy, :-wx]
    available = np.ones(totals.shape, dtype=bool)

    windows: list[Window] = []
    while len(windows) < n and available.any():
        masked = np.where(available, totals, -np.inf)
        i, j = np.unravel_index(int(np.argmax(masked)), masked.shape)
        if windows and totals[i, j] <= 0:
            break  # only empty places are left: one window is enough to show them
        y_edges = ys[[i, i + wy - 1]]
        x_edges = xs[[j, j + wx - 1]]
        windows.append(
            (
                float(x_edges.min() - cell_x / 2),
                float(y_edges.min() - cell_y / 2),
                float(x_edges.max() + cell_x / 2),
                float(y_edges.max() + cell_y / 2),
            )
        )
        # Blocks starting within (wy, wx) of this one would overlap it.
        available[max(0, i - wy + 1) : i + wy, max(0, j - wx + 1) : j + wx] = False
    return windows


def choose_windows_blockwise(
    census: xr.DataArray, n: int = 3, window: float = 5000.0, block: int = 100
) -> list[Window]:
    """:func:`choose_windows` over a census of any size, loading ``block`` × ``block`` cells
    at a time (a lazy census is never loaded whole): each block's best windows inside it,
    then the ``n`` whose census totals are largest."""
    census = census.transpose("y_cell", "x_cell")
    ny, nx = census.shape
    side = max(1, math.ceil(window / _cell_size(np.asarray(census["x_cell"].values))))
    block = max(block, 2 * side)
    best: list[tuple[float, Window]] = []
    for r0 in range(0, ny, block):
        for c0 in range(0, nx, block):
            sub = census.isel(y_cell=slice(r0, r0 + block), x_cell=slice(c0, c0 + block)).load()
            for w in choose_windows(sub, n, window):
                inside = sub.where(
                    (sub.x_cell > w[0]) & (sub.x_cell < w[2]) & (sub.y_cell > w[1])
                    & (sub.y_cell < w[3])
                )  # fmt: skip
                best.append((float(inside.sum()), w))
            best = sorted(best, key=lambda tw: -tw[0])[:n]
    return [w for _, w in best]


def _region_bounds(ds: xr.Dataset) -> Window:
    xs = np.asarray(ds["x"].values, dtype=float)
    ys = np.asarray(ds["y"].values, dtype=float)
    rx, ry = _cell_size(xs, 20.0) / 2, _cell_size(ys, 20.0) / 2
    return (xs.min() - rx, ys.min() - ry, xs.max() + rx, ys.max() + ry)


def _clip_window(win: Sequence[float], bounds: Window) -> Window:
    if len(win) != 4:
        raise ValueError(f"a window is (xmin, ymin, xmax, ymax), got {win!r}")
    xmin, ymin, xmax, ymax = map(float, win)
    if not (xmin < xmax and ymin < ymax):
        raise ValueError(f"window {win!r} is empty: need xmin < xmax and ymin < ymax")
    clipped = (
        max(xmin, bounds[0]),
        max(ymin, bounds[1]),
        min(xmax, bounds[2]),
        min(ymax, bounds[3]),
    )
    if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
        raise ValueError(f"window {win!r} lies outside the region {tuple(map(float, bounds))}")
    return clipped


def _sel_window(da: xr.DataArray, win: Window, ydim: str, xdim: str) -> xr.DataArray:
    """Select the pixels/cells whose centres lie in ``win`` (either axis order)."""
    xmin, ymin, xmax, ymax = win
    out = da
    for dim, lo, hi in ((xdim, xmin, xmax), (ydim, ymin, ymax)):
        coord = da[dim].values
        ascending = coord.size < 2 or coord[1] > coord[0]
        out = out.sel({dim: slice(lo, hi) if ascending else slice(hi, lo)})
    return out


# --------------------------------------------------------------------------- panels
def _stretch(rgb: np.ndarray, lo_pct: float = 2.0, hi_pct: float = 98.0) -> np.ndarray:
    """Common percentile stretch of an (h, w, 3) array to 0..1; NaN pixels grey."""
    finite = np.isfinite(rgb)
    out = np.empty(rgb.shape, dtype=float)
    if finite.any():
        lo, hi = np.percentile(rgb[finite], [lo_pct, hi_pct])
        if not hi > lo:
            hi = lo + 1e-6
        out[:] = np.clip((rgb - lo) / (hi - lo), 0.0, 1.0)
    nodata = ~finite.all(axis=-1)
    out[nodata] = _NODATA_RGB
    return out


def _extent_km(da: xr.DataArray, ydim: str = "y", xdim: str = "x") -> list[float]:
    xs = np.asarray(da[xdim].values, dtype=float)
    ys = np.asarray(da[ydim].values, dtype=float)
    rx, ry = _cell_size(xs, 20.0) / 2, _cell_size(ys, 20.0) / 2
    # imshow draws row 0 at the top with origin="upper"; y descending keeps north up.
    top, bottom = (ys[0] + ry, ys[-1] - ry) if ys[0] >= ys[-1] else (ys[0] - ry, ys[-1] + ry)
    return [(xs[0] - rx) / 1e3, (xs[-1] + rx) / 1e3, bottom / 1e3, top / 1e3]


def _robust_max(values: np.ndarray, pct: float = 99.5) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    top = float(np.percentile(finite, pct))
    return top if top > 0 else max(float(finite.max()), 1.0)


def _cmap(name: str):
    return colormaps[name].with_extremes(bad=_NODATA_RGB)


def _grid(ax: Axes, win: Window, cell: float, color: str = "white") -> None:
    """Draw 1 km grid lines and set km axis labels."""
    xmin, ymin, xmax, ymax = win
    xs = np.arange(math.ceil(xmin / cell), math.floor(xmax / cell) + 1) * cell / 1e3
    ys = np.arange(math.ceil(ymin / cell), math.floor(ymax / cell) + 1) * cell / 1e3
    kw = {"color": color, "linewidth": 0.4, "alpha": 0.45}
    if len(xs) + len(ys) <= 4 * _MAX_LABELLED_CELLS:
        ax.vlines(xs, ymin / 1e3, ymax / 1e3, **kw)
        ax.hlines(ys, xmin / 1e3, xmax / 1e3, **kw)
    ax.set_xlim(xmin / 1e3, xmax / 1e3)
    ax.set_ylim(ymin / 1e3, ymax / 1e3)
    ax.set_xlabel("x (km, EPSG:3035)")
    ax.set_ylabel("y (km)")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.ticklabel_format(useOffset=False, style="plain")


def _label_cells(ax: Axes, census: xr.DataArray) -> None:
    """Print each cell's census count at its centre."""
    ny, nx = census.sizes["y_cell"], census.sizes["x_cell"]
    if max(ny, nx) > _MAX_LABELLED_CELLS or census.size == 0:
        return
    fontsize = float(np.clip(40.0 / max(ny, nx), 4.0, 8.0))
    stroke = [pe.withStroke(linewidth=1.8, foreground="black")]
    values = np.asarray(census.transpose("y_cell", "x_cell").values, dtype=float)
    ys = census["y_cell"].values / 1e3
    xs = census["x_cell"].values / 1e3
    for i, yc in enumerate(ys):
        for j, xc in enumerate(xs):
            v = values[i, j]
            text = "?" if not np.isfinite(v) else f"{round(v):d}"
            ax.text(
                xc,
                yc,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white",
                path_effects=stroke,
                clip_on=True,
            )


def _window_title(win: Window) -> str:
    xmin, ymin, xmax, ymax = (v / 1e3 for v in win)
    return f"x {xmin:g}–{xmax:g} km, y {ymin:g}–{ymax:g} km"


# --------------------------------------------------------------------------- public
def quicklook(
    ds: xr.Dataset,
    path: str | Path,
    *,
    rgb: Sequence[str] = ("B04", "B03", "B02"),
    windows: Sequence[Sequence[float]] | None = None,
    n_windows: int = 3,
    window: float = 5000.0,
    dpi: int = 110,
) -> Path:
    """Write a quicklook PNG of a finished run: one row of three panels per window.

    Panels: the Sentinel-2 true colour (2–98 % stretch common to the three bands, no data
    grey); people per 20 m pixel (symmetric-log colour scale); smoothed density in
    persons/km² with each 1 km cell's census count printed at its centre (``?`` where the
    census is unknown). All panels carry the 1 km grid and axes in km.

    Parameters
    ----------
    ds : xarray.Dataset
        A run's output (the store contract): ``composite`` (band, y, x), ``population``
        (y, x), ``density`` (y, x) and ``census`` (y_cell, x_cell). May be lazy (dask); only
        the windows are loaded.
    path : str or pathlib.Path
        PNG file to write; parent directories are created.
    rgb : sequence of str
        Names of the red, green and blue bands in ``ds.band``.
    windows : sequence of (xmin, ymin, xmax, ymax), optional
        Windows in metres (EPSG:3035), clipped to the region. By default
        :func:`choose_windows` picks ``n_windows`` windows of ``window`` metres over the most
        populated places.
    n_windows : int
        Number of windows chosen when ``windows`` is not given.
    window : float
        Side in metres of the windows chosen when ``windows`` is not given.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    pathlib.Path
        The PNG written.

    Raises
    ------
    ValueError
        If a variable or an ``rgb`` band is missing (the message names those present), or a
        window is empty or outside the region.
    """
    needed = ["composite", "population", "density", "census"]
    missing_vars = [v for v in needed if v not in ds.data_vars]
    if missing_vars:
        raise ValueError(
            f"quicklook needs variables {missing_vars}; the dataset has {list(ds.data_vars)}"
        )
    rgb = list(rgb)
    if len(rgb) != 3:
        raise ValueError(f"rgb must name three bands, got {rgb}")
    present = [str(b) for b in ds["composite"]["band"].values]
    absent = [b for b in rgb if b not in present]
    if absent:
        raise ValueError(f"rgb band(s) {absent} not in the composite; bands present: {present}")

    bounds = _region_bounds(ds)
    if windows is None:
        wins = choose_windows_blockwise(ds["census"], n_windows, window)
        wins = [_clip_window(w, bounds) for w in wins]
    else:
        wins = [_clip_window(w, bounds) for w in windows]
        if not wins:
            raise ValueError("windows is empty")
    cell = _cell_size(np.asarray(ds["x_cell"].values, dtype=float), 1000.0)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(15.5, 4.7 * len(wins)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    try:
        axes = fig.subplots(len(wins), 3, squeeze=False)
        for row, win in zip(axes, wins, strict=True):
            _draw_row(ds, win, row, rgb, cell)
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        fig.clear()
    return path


def _draw_row(
    ds: xr.Dataset, win: Window, row: Sequence[Axes], rgb: list[str], cell: float
) -> None:
    ax_rgb, ax_pop, ax_den = row
    comp = _sel_window(ds["composite"].sel(band=rgb), win, "y", "x").transpose("y", "x", "band")
    pop = _sel_window(ds["population"], win, "y", "x").transpose("y", "x")
    den = _sel_window(ds["density"], win, "y", "x").transpose("y", "x")
    census = _sel_window(ds["census"], win, "y_cell", "x_cell")
    if pop.size == 0:
        raise ValueError(f"window {win} holds no pixel centres")
    extent = _extent_km(pop)
    title = _window_title(win)

    ax_rgb.imshow(
        _stretch(np.asarray(comp.values, dtype=float)),
        extent=extent,
        interpolation="nearest",
    )
    ax_rgb.set_title(f"Sentinel-2 true colour ({'/'.join(rgb)})\n{title}", fontsize=9)
    _grid(ax_rgb, win, cell)

    pop_v = np.asarray(pop.values, dtype=float)
    vmax = _robust_max(pop_v, 99.9)
    norm = SymLogNorm(linthresh=max(vmax / 1000, 1e-3), vmin=0.0, vmax=vmax, base=10)
    im = ax_pop.imshow(
        np.ma.masked_invalid(pop_v),
        extent=extent,
        cmap=_cmap("magma"),
        norm=norm,
        interpolation="nearest",
    )
    fig = ax_pop.get_figure()
    fig.colorbar(im, ax=ax_pop, shrink=0.85, label="persons per 20 m pixel")
    total = np.nansum(pop_v)
    ax_pop.set_title(f"people per pixel (total {total:,.0f})\n{title}", fontsize=9)
    _grid(ax_pop, win, cell)

    den_v = np.asarray(den.values, dtype=float)
    dmax = _robust_max(den_v, 99.9)
    dnorm = SymLogNorm(linthresh=max(dmax / 300, 1.0), vmin=0.0, vmax=dmax, base=10)
    im = ax_den.imshow(
        np.ma.masked_invalid(den_v),
        extent=extent,
        cmap=_cmap("viridis"),
        norm=dnorm,
        interpolation="bilinear",
    )
    fig.colorbar(im, ax=ax_den, shrink=0.85, label="persons per km² (smoothed)")
    ax_den.set_title(f"density, census count per 1 km cell\n{title}", fontsize=9)
    _grid(ax_den, win, cell)
    _label_cells(ax_den, census)


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination of ``predicted`` against ``observed`` (finite pairs).

    Parameters
    ----------
    observed, predicted : array_like
        Values of the same shape.

    Returns
    -------
    float
        ``1 - SS_res / SS_tot``; NaN with fewer than two pairs or constant ``observed``.
    """
    obs = np.asarray(observed, dtype=float).ravel()
    pred = np.asarray(predicted, dtype=float).ravel()
    ok = np.isfinite(obs) & np.isfinite(pred)
    obs, pred = obs[ok], pred[ok]
    if obs.size < 2:
        return float("nan")
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(np.sum((obs - pred) ** 2)) / ss_tot


def scatter(
    observed: np.ndarray | xr.DataArray,
    predicted: np.ndarray | xr.DataArray,
    path: str | Path,
    *,
    title: str = "Predicted vs census, per 1 km cell",
    log: bool = True,
    xlabel: str = "census (persons per cell)",
    ylabel: str = "predicted (persons per cell)",
    max_points: int = 200_000,
    dpi: int = 110,
) -> Path:
    """Write a scatter plot of predicted against observed counts, with a 1:1 line and R².

    Parameters
    ----------
    observed, predicted : array_like or xarray.DataArray
        Counts of the same shape (e.g. ``ds.census`` and ``ds.predicted``); pairs where either
        is NaN are left out.
    path : str or pathlib.Path
        PNG file to write; parent directories are created.
    title : str
        First line of the title; R² and the number of cells are added below it.
    log : bool
        Symmetric-log axes (linear below 1, so zeros are shown); linear axes if False.
    xlabel, ylabel : str
        Axis labels.
    max_points : int
        At most this many points are drawn (a fixed random subset); R² uses all pairs.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    pathlib.Path
        The PNG written.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    obs = np.asarray(observed, dtype=float)
    pred = np.asarray(predicted, dtype=float)
    if obs.shape != pred.shape:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} differ in shape")
    obs, pred = obs.ravel(), pred.ravel()
    ok = np.isfinite(obs) & np.isfinite(pred)
    obs, pred = obs[ok], pred[ok]
    r2 = r_squared(obs, pred)
    n = obs.size
    if n > max_points:
        keep = np.random.default_rng(0).choice(n, size=max_points, replace=False)
        obs_d, pred_d = obs[keep], pred[keep]
    else:
        obs_d, pred_d = obs, pred

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.6, 5.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    try:
        ax = fig.subplots()
        ax.scatter(
            obs_d,
            pred_d,
            s=6 if n < 5000 else 2,
            alpha=0.5 if n < 5000 else 0.25,
            linewidths=0,
            color="tab:blue",
            rasterized=True,
        )
        top = max(float(np.max(obs)) if n else 1.0, float(np.max(pred)) if n else 1.0, 1.0)
        lims = (0.0, top * 1.15)
        ax.plot(lims, lims, color="0.3", linewidth=1, linestyle="--", label="1:1")
        ax.set_xlim(lims)
        ax.set_ylim(lims)
        if log:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_aspect("equal")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left", frameon=False)
        r2_text = "nan" if math.isnan(r2) else f"{r2:.3f}"
        ax.set_title(f"{title}\nR² = {r2_text}, n = {n:,}", fontsize=10)
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        fig.clear()
    return path


# --------------------------------------------------------------------------- export
def export_quicklook(
    out: str | Path,
    path: str | Path,
    *,
    layers: Sequence[str] = ("population", "density"),
    max_px: int = 600,
    dpi: int = 110,
) -> Path:
    """Draw an export's VRT mosaics (:mod:`popdask.exporter`) as they read, one panel a
    layer, decimated by the smallest power of two that keeps each panel within ``max_px``
    pixels (GDAL reads the COGs' overviews; ``average`` resampling).

    A count layer is drawn as persons per displayed pixel: its average × the displayed
    pixel's area over the base pixel's, which is how its overviews sum (the panel's total is
    the layer's). Returns ``path``.
    """
    import rasterio
    from rasterio.enums import Resampling

    fig = Figure(figsize=(5.2 * len(layers), 4.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, len(layers), squeeze=False)[0], layers, strict=True):
        with rasterio.open(Path(out) / f"{name}.vrt") as ds:
            f = 2 ** max(0, math.ceil(math.log2(max(ds.width, ds.height) / max_px)))
            shape = (math.ceil(ds.height / f), math.ceil(ds.width / f))
            area = (ds.height / shape[0]) * (ds.width / shape[1])  # f² when f divides
            v = ds.read(1, out_shape=shape, resampling=Resampling.average, masked=True)
            v = np.ma.filled(v.astype(float), np.nan)
            b, unit, version = ds.bounds, ds.units[0] or "", ds.tags().get("product_version")
        extent = [b.left / 1e3, b.right / 1e3, b.bottom / 1e3, b.top / 1e3]
        if name.split("/")[0] in ("population", "population_by"):
            v, res = v * area, ds.res[0] * f
            unit, title = f"persons per {res:g} m pixel", f"{name} (total {np.nansum(v):,.0f})"
        else:
            title = name
        vmax = _robust_max(v, 99.9)
        norm = SymLogNorm(linthresh=max(vmax / 300, 1e-3), vmin=0.0, vmax=vmax, base=10)
        cmap = _cmap("magma" if "population" in name else "viridis")
        im = ax.imshow(np.ma.masked_invalid(v), extent=extent, cmap=cmap, norm=norm,
                       interpolation="nearest")  # fmt: skip
        fig.colorbar(im, ax=ax, shrink=0.85, label=unit)
        ax.set_title(f"{title}\n{name}.vrt, 1/{f} decimation, version {version}", fontsize=9)
        ax.set_xlabel("x (km, EPSG:3035)")
        ax.set_ylabel("y (km)")
    fig.savefig(path, dpi=dpi, format="png")
    return Path(path)
