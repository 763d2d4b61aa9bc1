"""Census variables mapped with the population's own weights (``census.columns``).

The Census 2021 grid publishes per 1 km cell the total ``T`` and its breakdowns: sex
(``M + F``), three age bands, country of birth (``NAT + EU_OTH + OTH``), residence a year
before (``SAME + CHG_IN + CHG_OUT``), and the employed (``EMP``, part of ``T``). Disclosure
perturbation makes a breakdown add up to something other than ``T``. So, cell by cell
(:func:`reconcile`, pure):

- a breakdown (:data:`PARTITIONS`, those whose members are all mapped) whose members are all
  known and sum to ``s > 0`` is scaled by ``T / s`` (each member keeps its share); if any
  member is unknown, or ``s = 0`` while ``T > 0``, the whole breakdown is unknown there;
- any other variable is clipped to ``[0, T]`` (a part of the population cannot exceed it);
- where ``T = 0`` every variable is 0; where ``T`` is unknown they stay as published.

A pixel then holds ``population × share`` of each variable, the share being its cell's
``variable / T`` where both are known and ``T > 0``, else the region's (:func:`shares`): every
layer sums to its cell's (reconciled) value where the census gives one, and a breakdown's
layers sum to the population layer pixel by pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: the Census 2021 grid's breakdowns of ``T``: reconciled to it where all members are mapped
PARTITIONS = (
    ("M", "F"),
    ("Y_LT15", "Y_1564", "Y_GE65"),
    ("NAT", "EU_OTH", "OTH"),
    ("SAME", "CHG_IN", "CHG_OUT"),
)


def partitions_of(names: Sequence[str]) -> list[list[int]]:
    """The :data:`PARTITIONS` whose members are all in ``names``, as indices into it."""
    index = {n: i for i, n in enumerate(names)}
    return [[index[m] for m in p] for p in PARTITIONS if all(m in index for m in p)]


def reconcile(
    total: np.ndarray, values: np.ndarray, names: Sequence[str]
) -> tuple[np.ndarray, int]:
    """Make each cell's variables consistent with its total (see the module's docstring).

    Parameters
    ----------
    total
        ``(...)`` the population column per cell (NaN unknown).
    values
        ``(n_variables, ...)`` the variables per cell, as published (NaN unknown).
    names
        The variables' column names.

    Returns
    -------
    (values, n_scaled)
        float32 reconciled values, and how many (cell, breakdown) pairs were rescaled.
    """
    total = np.asarray(total, np.float64)
    out = np.array(values, np.float64)
    n_scaled = 0
    parts = partitions_of(names)
    in_part = {i for p in parts for i in p}
    with np.errstate(invalid="ignore", divide="ignore"):
        for p in parts:
            members = out[p]
            s = members.sum(axis=0)  # NaN if any member is unknown
            usable = np.isfinite(total) & (total > 0) & np.isfinite(s) & (s > 0)
            scale = np.where(usable, total / s, np.nan)
            n_scaled += int((usable & ~np.isclose(s, total, rtol=0, atol=1e-9)).sum())
            unknown = np.isfinite(total) & (total > 0) & ~usable
            members = np.where(usable, members * scale, members)
            members[:, unknown] = np.nan
            out[p] = members
        for i in set(range(len(out))) - in_part:
            out[i] = np.where(np.isfinite(total), np.clip(out[i], 0, total), out[i])
    out[:, np.isfinite(total) & (total == 0)] = 0.0
    return out.astype(np.float32), n_scaled


def shares(total: np.ndarray, values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``(n_variables, ...)`` share of each cell's population in each variable: ``value /
    total`` where both are known and ``total > 0``, else ``fallback`` (the region's)."""
    total = np.asarray(total, np.float64)
    values = np.asarray(values, np.float64)
    fallback = np.asarray(fallback, np.float64).reshape((-1,) + (1,) * total.ndim)
    with np.errstate(invalid="ignore", divide="ignore"):
        own = values / total
    ok = np.isfinite(own) & (total > 0)
    return np.where(ok, own, fallback)


def share_sums(total: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per variable, ``Σ value`` and ``Σ total`` over the cells where both are known and
    ``total > 0``: summed over blocks, their ratio is the region's share."""
    total = np.asarray(total, np.float64)
    values = np.asarray(values, np.float64)
    ok = np.isfinite(values) & (np.isfinite(total) & (total > 0))
    num = np.where(ok, values, 0.0).reshape(len(values), -1).sum(axis=1)
    den = np.where(ok, total, 0.0).reshape(len(values), -1).sum(axis=1)
    return num, den


def pixel_layers(population: np.ndarray, cell_shares: np.ndarray, cell_px: int) -> np.ndarray:
    """``(n_variables, y, x)`` persons per pixel in each variable: the pixel's population
    times its cell's share (the tile's pixels hold whole cells)."""
    grown = np.repeat(np.repeat(cell_shares, cell_px, axis=1), cell_px, axis=2)
    return (population[None] * grown).astype(np.float32)
