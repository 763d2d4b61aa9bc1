"""popdask: where people live, at 20 m, from STAC catalogs, dask-ml and the 1 km census.

The public entry points:

- :func:`popdask.pipeline.run` — run every pass of a :class:`popdask.config.Config`;
- :func:`popdask.config.load_config` — read and validate a YAML run configuration;
- :func:`popdask.regression.fit_densities` — persons per cluster from cell fractions;
- :func:`popdask.synthetic.make_demo_region` — the generated demo region;
- :func:`popdask.export` — a store as COGs, VRTs and STAC (:mod:`popdask.exporter`);
- :func:`popdask.aggregate` — people per polygon of a finished store (:mod:`popdask.zonal`);
- the ``popdask`` command (:mod:`popdask.cli`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("popdask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__", "aggregate", "export"]


def __getattr__(name: str):
    # imported on first use: rasterio, pystac, geopandas and exactextract are not light
    if name == "export":
        from popdask.exporter import export

        return export
    if name == "aggregate":
        from popdask.zonal import aggregate

        return aggregate
    raise AttributeError(f"module 'popdask' has no attribute {name!r}")
