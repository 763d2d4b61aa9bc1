"""The ``popdask`` command: ``demo``, ``run``, ``plan``, ``status``, ``evaluate``,
``export``, ``aggregate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from popdask import __version__


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    import distributed  # noqa: F401  (configures its loggers; quiet them after)

    noisy = ("distributed", "bokeh", "tornado", "urllib3", "rasterio", "numba")
    for name in [*noisy, *logging.root.manager.loggerDict]:
        if name.split(".")[0] in noisy:
            level = logging.ERROR if name.split(".")[0] == "distributed" else logging.WARNING
            logging.getLogger(name).setLevel(level)


def _print_metrics(metrics: dict) -> None:
    keys = [k for k in metrics if k != "timings_s"]
    width = max(len(k) for k in keys)
    for k in keys:
        v = metrics[k]
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    print("  timings (s): " + ", ".join(f"{k} {v}" for k, v in metrics["timings_s"].items()))


def cmd_demo(args: argparse.Namespace) -> int:
    from popdask.demo import run_demo

    result, _ = run_demo(args.out, size_km=args.size_km, seed=args.seed, overrides=args.set)
    print(f"popdask demo: store {result.path}")
    print(f"popdask demo: reports {args.out}/metrics.json, {args.out}/quicklook.png")
    _print_metrics(result.metrics)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from popdask.config import load_config
    from popdask.pipeline import run

    cfg = load_config(args.config, args.set)
    result = run(cfg, report_dir=args.report_dir)
    print(f"popdask run: store {result.path}")
    _print_metrics(result.metrics)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from popdask.config import load_config
    from popdask.plan import format_plan, plan
    from popdask.sources import SourceError

    cfg = load_config(args.config, args.set)
    try:
        p = plan(cfg, sample=args.sample or None)
    except SourceError as e:
        print(f"popdask plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(p, cfg))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import numpy as np

    from popdask import store

    status = store.tile_status(args.store, json.loads(args.storage_options))
    counts = {name: int((status == code).sum()) for code, name in store.STATUS_NAMES.items()}
    print(f"{args.store}: {status.size} tiles: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    census = store.census_attrs(args.store, json.loads(args.storage_options))
    if "cells_known" in census:
        total = sum(int(census[k]) for k in ("cells_known", "cells_absent_zero", "cells_unknown"))
        print(
            f"  census {census.get('source', '')} ({census.get('column', '')}): {total} cells: "
            f"{census['cells_known']} known, {census['cells_absent_zero']} zero by absence, "
            f"{census['cells_unknown']} unknown"
        )
    _print_scenes(args.store, json.loads(args.storage_options), min_scenes=args.min_scenes)
    return 0 if np.all(status == store.COMPLETE) else 3


def _print_scenes(path: str, so: dict, min_scenes: int = 3, named: int = 10) -> None:
    """What the composite tasks counted: Sentinel-2 scenes per tile, the tiles that had
    none usable or fewer than ``min_scenes``, reads filled as nodata, the valid share, and
    the items whose radiometric offset was corrected from their pixels."""
    import numpy as np

    from popdask import store

    try:
        scenes = store.tile_scenes(path, so)
        counts = store.tile_counts(path, so)
    except KeyError:  # a store written before the composites were counted
        return
    done = scenes >= 0
    if not done.any():
        return
    ids = _tile_ids(path, so)
    n = scenes[done]
    print(
        f"  Sentinel-2 scenes per composited tile: min {n.min()}, median "
        f"{int(np.median(n))}, max {n.max()} ({n.size} tiles)"
    )

    def name(mask) -> str:
        picked = [ids[int(r), int(c)] for r, c in np.argwhere(mask)]
        more = f" and {len(picked) - named} more" if len(picked) > named else ""
        return f"{', '.join(picked[:named])}{more}"

    if (scenes == 0).any():
        print(
            f"  {int((scenes == 0).sum())} tiles without a usable scene (their people are the "
            f"census spread evenly over their cells): {name(scenes == 0)}"
        )
    few = (scenes > 0) & (scenes < min_scenes)
    if few.any():
        print(
            f"  {int(few.sum())} tiles composited from fewer than {min_scenes} scenes: {name(few)}"
        )
    valid = counts["valid_permille"][done] / 10
    low, mid = valid.min(), np.median(valid)
    print(f"  valid pixels per composited tile: min {low:.1f} %, median {mid:.1f} %")
    filled = counts["reads_filled"]
    if (filled > 0).any():
        print(
            f"  {int(filled[filled > 0].sum())} reads filled as nodata (assets the catalog "
            f"lists but storage has not) in {int((filled > 0).sum())} tiles: {name(filled > 0)}"
        )
    fixed = counts["offsets_corrected"] > 0
    if fixed.any():
        _print_offsets(path, so, [ids[int(r), int(c)] for r, c in np.argwhere(fixed)], named=named)


def _tile_ids(path: str, so: dict) -> dict[tuple[int, int], str]:
    """``{(tile_row, tile_col): tile id}`` of the store's grid."""
    from popdask import store
    from popdask.grid import Grid

    g = store.root_attrs(path, so)["popdask"]["grid"]
    grid = Grid(tuple(g["bounds"]), resolution=g["resolution"], cell=g["cell"], tile=g["tile"])
    return {(t.row, t.col): t.id for t in grid.tiles()}


def _print_offsets(path: str, so: dict, tile_ids: list[str], named: int = 10) -> None:
    """The Sentinel-2 items whose offset the pixels corrected (read from the headers of
    the tiles' catalog records), with the reason and the evidence."""
    from popdask.catalog import offset_corrections

    fixed = offset_corrections(path, tile_ids, so)
    if not fixed:
        return
    rows = [(t, it) for t, items in fixed.items() for it in items]
    print(
        f"  {len(rows)} Sentinel-2 items in {len(fixed)} tiles had their offset corrected "
        "from their pixels (the catalog's offset metadata was wrong):"
    )
    for t, it in rows[:named]:
        print(
            f"    {t} {it['id']}: {it['offset']:+g} -> {it['applied']:+g} ({it['reason']}: "
            f"darkest 1% at {it['dark']:.3f}, {it['negative']:.0%} below 0, "
            f"{it['pixels']} clear pixels)"
        )
    if len(rows) > named:
        print(f"    and {len(rows) - named} more")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a finished store: 1 km fit, bias by class, coarse to fine, truth."""
    from pathlib import Path

    from popdask import store
    from popdask.evaluate import evaluate, load_truth

    def _fmt(v, spec: str = ".3f") -> str:
        return "—" if v is None else format(v, spec)

    so = json.loads(args.storage_options)
    if args.out is not None:
        out = Path(args.out)
    elif "://" in args.store:
        out = Path.cwd()
    else:
        out = Path(args.store).resolve().parent
    truth = None
    if args.truth:
        if not store.exists(args.store, so):
            raise ValueError(f"{args.store} is not a popdask store")
        grid = store.open_group(args.store, so, mode="r").attrs["popdask"]["grid"]
        truth = load_truth(args.truth, grid["bounds"], grid["resolution"])
    r = evaluate(
        args.store,
        truth=truth,
        n_splits=args.splits,
        block=args.block,
        storage_options=so,
        figure=out / "evaluation.png",
        json_path=out / "evaluation.json",
    )
    c = r["cells"]
    print(
        f"popdask evaluate: {args.store}: {c['used']} of {c['total']} cells used, "
        f"{r['clusters']} clusters; {r['n_splits']}-fold CV over {args.block:g} m blocks"
    )
    rows = [
        ("1 km fit, in-sample", r["fit_1km"]["in_sample"]),
        ("1 km fit, CV", r["fit_1km"]["cv"]),
    ]
    for ctf in r["coarse_to_fine"].values():
        if ctf.get("in_sample") is None:
            continue
        km = ctf["factor"] * r["grid"]["cell"] / 1000
        rows.append((f"{km:g} km → 1 km, in-sample", ctf["in_sample"]["model"]))
        rows.append((f"{km:g} km → 1 km, rescaled", ctf["in_sample"]["rescaled"]))
        if ctf.get("cv"):
            rows.append((f"{km:g} km → 1 km, CV", ctf["cv"]["model"]))
            rows.append((f"{km:g} km → 1 km, CV rescaled", ctf["cv"]["rescaled"]))
        rows.append((f"{km:g} km → 1 km, areal baseline", ctf["baseline_areal"]))
    for est, by_scale in (r.get("truth") or {}).items():
        for scale, s in by_scale.items():
            if isinstance(s, dict) and scale != "1000m":
                rows.append((f"truth {scale}: {est}", s))
    width = max(len(n) for n, _ in rows)
    print(f"  {'':<{width}}  {'R²':>7} {'MAE':>9} {'RMSE':>9} {'R² log':>7}")
    for name, s in rows:
        if s is None:
            print(f"  {name:<{width}}  (not enough groups)")
            continue
        print(
            f"  {name:<{width}}  {_fmt(s['r2']):>7} {_fmt(s['mae'], '.4g'):>9} "
            f"{_fmt(s['rmse'], '.4g'):>9} {_fmt(s['r2_log1p']):>7}"
        )
    print("  bias by density class (persons per cell, predicted − census; CV):")
    bias = r["bias_by_class"]["cv"] or r["bias_by_class"]["in_sample"]
    for cls, b in bias.items():
        rel = "" if b["relative_bias"] is None else f" ({b['relative_bias']:+.1%})"
        val = "—" if b["bias"] is None else f"{b['bias']:+.1f}{rel}"
        print(f"    {cls:<11} n={b['n']:<5} {val}")
    if r.get("intervals"):
        i = r["intervals"]
        print(
            "  90 % intervals against the truth (populated places): "
            f"100 m {i['interval_coverage_100m_populated']:.1%}, "
            f"1 km {i['interval_coverage_1km_populated']:.1%} covered"
        )
    print(f"popdask evaluate: wrote {out / 'evaluation.json'} and {out / 'evaluation.png'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a store as COGs, VRTs and a STAC collection (popdask.exporter)."""
    from popdask.config import ClusterConfig
    from popdask.exporter import export

    layers = [x.strip() for x in args.layers.split(",")] if args.layers else None
    so, oo = json.loads(args.storage_options), json.loads(args.out_storage_options)
    cluster = ClusterConfig(kind="address", address=args.scheduler) if args.scheduler else None
    r = export(args.store, args.out, layers, storage_options=so, out_options=oo, cluster=cluster)
    print(
        f"popdask export: {args.out}: version {r.version}, {len(r.tiles)} tiles, {r.seconds:.1f} s"
    )
    for name, s in r.layers.items():
        total = f", sum {s['sum']:.6g}" if "overview_gap" in s else ""  # a count layer
        print(f"  {name}: {s['files']} COGs, {s['bytes'] / 1e6:.2f} MB{total}")
    if r.skipped:
        print(f"  {len(r.skipped)} incomplete tiles not exported: {', '.join(r.skipped[:10])}")
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    """People per polygon of a store, written to a CSV, Parquet or GeoPackage table."""
    from popdask.cluster import get_client
    from popdask.config import ClusterConfig
    from popdask.zonal import aggregate, output_format

    output_format(args.out)  # a wrong extension fails before a cluster starts
    cluster = ClusterConfig(kind="address", address=args.scheduler) if args.scheduler else None
    columns = [c for c in args.columns.split(",") if c] if args.columns else None
    with get_client(cluster) as client:
        table = aggregate(
            args.store,
            args.zones,
            args.out,
            layer=args.layer,
            columns=columns,
            crs=args.crs,
            storage_options=json.loads(args.storage_options),
            client=client,
            progress=True,
        )
    outside = int((table["covered_fraction"] == 0).sum())
    print(
        f"popdask aggregate: {len(table)} zones, {table['population'].sum():,.0f} persons "
        f"({outside} zones without data); wrote {args.out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popdask", description=__doc__)
    p.add_argument("--version", action="version", version=f"popdask {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate a demo region, serve it over STAC, run, report")
    d.add_argument("--out", default="popdask-demo", help="output folder (default: popdask-demo)")
    d.add_argument("--size-km", type=int, default=20, help="side of the region (default: 20)")
    d.add_argument("--seed", type=int, default=0, help="seed of the generated region")
    d.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key, e.g. model.clusters=80",
    )
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run a YAML configuration (any region, any STAC API)")
    r.add_argument("config", help="run configuration (YAML)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key, e.g. model.clusters=80",
    )
    r.add_argument(
        "--report-dir",
        default=None,
        help="where to write metrics.json and quicklook.png (default: beside the store)",
    )
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser(
        "plan", help="tiles, items, bytes, core-hours and store size of a run, reading no pixel"
    )
    pl.add_argument("config", help="run configuration (YAML)")
    pl.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key, e.g. region.bbox=[...]",
    )
    pl.add_argument(
        "--sample",
        type=int,
        default=200,
        help="search this many tiles, evenly spread, and extrapolate (0: every tile; default: 200)",
    )
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser("status", help="tiles done / missing / failed in a store")
    s.add_argument("store", help="path or URL of the output Zarr store")
    s.add_argument("--storage-options", default="{}", help="JSON fsspec storage options")
    s.add_argument(
        "--min-scenes",
        type=int,
        default=3,
        help="name the tiles composited from fewer Sentinel-2 scenes (default: 3)",
    )
    s.set_defaults(func=cmd_status)

    e = sub.add_parser(
        "evaluate", help="score a finished store: 1 km CV, bias by class, coarse to fine, truth"
    )
    e.add_argument("store", help="path or URL of the output Zarr store")
    e.add_argument("--truth", default=None, help="true persons per pixel (GeoTIFF on the grid)")
    e.add_argument(
        "--out", default=None, help="folder for evaluation.json/.png (default: beside the store)"
    )
    e.add_argument("--storage-options", default="{}", help="JSON fsspec storage options")
    e.add_argument("--splits", type=int, default=5, help="cross-validation folds (default: 5)")
    e.add_argument(
        "--block", type=float, default=5000.0, help="CV block side in metres (default: 5000)"
    )
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="a store as COGs per tile and layer, VRTs and STAC")
    x.add_argument("store", help="path or URL of the output Zarr store")
    x.add_argument("out", help="export folder (path or URL)")
    x.add_argument("--layers", default=None, help="comma-separated (default: population,density)")
    x.add_argument("--storage-options", default="{}", help="JSON fsspec options of the store")
    x.add_argument("--out-storage-options", default="{}", help="JSON fsspec options of OUT")
    x.add_argument("--scheduler", default=None, help="dask scheduler address (default: local)")
    x.set_defaults(func=cmd_export)

    a = sub.add_parser(
        "aggregate", help="people per polygon (exact pixel coverage) to .csv, .parquet or .gpkg"
    )
    a.add_argument("store", help="path or URL of the output Zarr store")
    a.add_argument("zones", help="polygons: any file OGR reads (.gpkg, .shp, .geojson, ...)")
    a.add_argument("out", help="the table to write: .csv, .parquet or .gpkg (with geometry)")
    a.add_argument("--layer", default=None, help="layer of a multi-layer zones file")
    a.add_argument("--columns", default=None, help="zone columns to keep, e.g. LAU_ID,NAME")
    a.add_argument("--crs", default=None, help="CRS of zones that declare none: EPSG:4326")
    a.add_argument("--storage-options", default="{}", help="JSON fsspec storage options")
    a.add_argument(
        "--scheduler", default=None, help="address of a dask scheduler (default: a local cluster)"
    )
    a.set_defaults(func=cmd_aggregate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from popdask.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"popdask: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"popdask: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
