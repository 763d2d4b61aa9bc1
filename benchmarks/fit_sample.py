"""How much a densities fit on a sample of the cells loses against the fit on all of them.

A continental run fits its densities on at most ``regression.fit_cells`` cells, a uniform
sample picked by a hash of each cell (`popdask.reductions`). This script measures what that
costs on real cells: ``../shared/data/real_cells_dev.parquet`` (4,150 cells of 166 tiles,
the prototype's 150 cluster fractions). For each share of the training cells (1, 0.5,
0.25) and several hash seeds, every fold of a tile-grouped 5-fold cross-validation is
fitted on the share of its training cells the hash picks and scored on its whole held-out
fold. It prints the out-of-fold R² and MAE (mean and range over the seeds) and how far the
sampled fits' out-of-fold counts are from the full fit's.

    python benchmarks/fit_sample.py [--cells PATH] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from popdask import regression
from popdask.reductions import uniform

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_cells_dev.parquet"


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pandas as pd

    d = pd.read_parquet(path)
    d = d[d["pop"] >= 0]
    x = d[[f"F{i}" for i in range(150)]].to_numpy(np.float64)
    return x, d["pop"].to_numpy(np.float64), d["tile"].astype("category").cat.codes.to_numpy()


def out_of_fold(x, y, g, share: float, seed: int) -> np.ndarray:
    """Out-of-fold counts, each fold fitted on the hash-picked ``share`` of its training."""
    from sklearn.model_selection import GroupKFold

    keep = uniform(np.arange(len(y)), seed) < share
    pred = np.empty(len(y))
    for train, test in GroupKFold(5).split(x, y, g):
        t = train[keep[train]]
        dens = regression.fit_densities(x[t], y[t], g[t])
        pred[test] = x[test] @ dens
    return pred


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=Path, default=DEFAULT)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    args = p.parse_args(argv)
    x, y, g = load(args.cells)
    full = out_of_fold(x, y, g, 1.0, 0)
    out = {"cells": len(y), "shares": {}}
    for share in args.shares:
        seeds = [0] if share >= 1 else range(args.seeds)
        runs = [out_of_fold(x, y, g, share, s) for s in seeds]
        r2 = [regression.scores(y, r)["r2"] for r in runs]
        mae = [regression.scores(y, r)["mae"] for r in runs]
        vs_full = [regression.scores(full, r)["r2"] for r in runs]
        out["shares"][str(share)] = {
            "train_cells": round(share * len(y) * 0.8),
            "r2": [min(r2), float(np.mean(r2)), max(r2)],
            "mae": [min(mae), float(np.mean(mae)), max(mae)],
            "r2_against_full_fit": [min(vs_full), float(np.mean(vs_full)), max(vs_full)],
        }
        s = out["shares"][str(share)]
        print(
            f"share {share:<5} ~{s['train_cells']:>5} training cells: out-of-fold R² "
            f"{s['r2'][1]:.4f} ({s['r2'][0]:.4f}–{s['r2'][2]:.4f}), MAE {s['mae'][1]:.0f} "
            f"({s['mae'][0]:.0f}–{s['mae'][2]:.0f}); counts against the full fit's R² "
            f"{s['r2_against_full_fit'][1]:.4f}"
        )
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
