"""popdask: where people live, at 20 m, from STAC catalogs, dask-ml and the 1 km census.

The public entry points:

- :func:`popdask.pipeline.run` — run every pass of a :class:`popdask.config.Config`;
- :func:`popdask.config.load_config` — read and validate a YAML run configuration;
- :func:`popdask.regression.fit_densities` — persons per cluster from cell fractions;
- :func:`popdask.synthetic.make_demo_region` — the generated demo region;
- :func:`popdask.aggregate` — people per polygon of a finished store (module
  ``popdask/aggregate.py``, whose name the function takes over: import its helpers with
  ``from popdask.aggregate import ...``);
- the ``popdask`` command (:mod:`popdask.cli`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("popdask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

from popdask.aggregate import aggregate

__all__ = ["__version__", "aggregate"]
