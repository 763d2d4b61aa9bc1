"""The ``popdask`` command: ``demo``, ``run``, ``status``."""

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


def cmd_status(args: argparse.Namespace) -> int:
    import numpy as np

    from popdask import store

    status = store.tile_status(args.store, json.loads(args.storage_options))
    counts = {name: int((status == code).sum()) for code, name in store.STATUS_NAMES.items()}
    print(f"{args.store}: {status.size} tiles: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0 if np.all(status == store.COMPLETE) else 3


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

    s = sub.add_parser("status", help="tiles done / missing / failed in a store")
    s.add_argument("store", help="path or URL of the output Zarr store")
    s.add_argument("--storage-options", default="{}", help="JSON fsspec storage options")
    s.set_defaults(func=cmd_status)
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
