"""The run configuration: one typed, validated object read from YAML plus overrides.

Nothing else in popdask reads files or the environment for settings. The layout is the
contract of DESIGN.md ("Run configuration")::

    region: {bbox: [4321000, 3210000, 4341000, 3230000]}
    grid: {resolution: 20, cell: 1000, tile: 10000}
    stac: {url: https://planetarycomputer.microsoft.com/api/stac/v1, sign: planetary_computer}
    # or stac: {preset: planetary-computer} / {preset: earth-search} (see popdask.presets)
    sources:
      sentinel2: {collection: sentinel-2-l2a, datetime: 2019-06-01/2022-10-31, ...}
    census: {path: grid_1km.gpkg, column: TOT_P_2021}   # absent cells are 0 (see CensusConfig)
    model: {components: 12, clusters: 30, sample_pixels: 300000, seed: 0}
    regression: {rescale: true}
    output: {path: out.zarr, storage_options: {}}
    cluster: {kind: local}

Relative file paths are taken relative to the YAML file's folder.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from popdask.grid import Grid
from popdask.presets import PresetError, expand_presets
from popdask.secrets import is_secret_gdal_option, refuse_storage_secrets


class ConfigError(ValueError):
    """The run configuration is invalid; the message names the key and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegionConfig(_Model):
    bbox: tuple[float, float, float, float] | None = None
    bbox_lonlat: tuple[float, float, float, float] | None = None

    @model_validator(mode="after")
    def _one_bbox(self) -> RegionConfig:
        if (self.bbox is None) == (self.bbox_lonlat is None):
            raise ValueError(
                "give exactly one of region.bbox (EPSG:3035 metres) or region.bbox_lonlat "
                "(degrees: west, south, east, north)"
            )
        return self

    def bbox_3035(self) -> tuple[float, float, float, float]:
        """The region in EPSG:3035 metres (lon/lat boxes are densified and transformed)."""
        if self.bbox is not None:
            return self.bbox
        from pyproj import Transformer

        t = Transformer.from_crs("EPSG:4326", "EPSG:3035", always_xy=True)
        return tuple(t.transform_bounds(*self.bbox_lonlat, densify_pts=21))  # type: ignore[return-value]


class GridConfig(_Model):
    resolution: int = Field(20, gt=0)
    cell: int = Field(1000, gt=0)
    tile: int = Field(10000, gt=0)


class StacConfig(_Model):
    url: str | None = None
    sign: Literal["planetary_computer"] | None = None
    preset: str | None = None  # e.g. planetary-computer, earth-search (see popdask.presets)


class ReadConfig(_Model):
    """How COGs are read: cloud settings shipped to every worker with each task.

    Credentials are never here: GDAL and fsspec read them from the environment.
    """

    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for an S3-compatible server
    requester_pays: bool = False
    gdal: dict[str, str] = {}  # extra GDAL configuration options

    @field_validator("gdal")
    @classmethod
    def _no_gdal_secret(cls, v: dict[str, str]) -> dict[str, str]:
        secret = sorted(k for k in v if is_secret_gdal_option(k))
        if secret:
            raise ValueError(
                f"{', '.join(secret)} hold credentials and are not accepted in the "
                "configuration (it travels in every task); set them in the environment of "
                "the client and the workers instead"
            )
        return v


class SourceConfig(_Model):
    """One STAC source. ``url``/``sign`` default to the ``stac`` section's.

    ``assets`` are the catalog's asset keys; ``rename`` maps an asset key to the band name the
    composite uses (canonical ``B02`` … for Sentinel-2, see :mod:`popdask.presets`).
    ``subdataset`` reads each asset as a GDAL subdataset (``HDF5://path/in/file`` or a path
    with an ``{href}`` placeholder). ``preset`` records the catalog preset this source came
    from (already expanded when the model is built by :func:`config_from_dict`).

    ``max_items`` caps a tile's scenes *per footprint* (per MGRS granule and orbit, or per
    Sentinel-1 orbit; :func:`popdask.catalog.choose_items`): each footprint that touches a
    tile keeps its ``max_items`` least cloudy acquisitions, so a tile on a granule edge has
    scenes of both granules. The default, 24, keeps the tile's stack in memory: a 500 × 500
    px tile of 12 float32 assets is 12 MB per item, 288 MB per footprint, ~0.6 GB for the
    usual one or two footprints and ~1.2 GB at a four-footprint corner; 24 clear scenes make
    a stable median (four summers give 100+ per footprint before the cap).
    """

    collection: str
    datetime: str
    assets: list[str] = Field(min_length=1)
    url: str | None = None
    sign: Literal["planetary_computer"] | None = None
    preset: str | None = None
    rename: dict[str, str] = {}
    subdataset: str | None = None
    months: list[int] | None = None
    max_cloud_cover: float | None = Field(None, ge=0, le=100)
    mask_asset: str | None = None
    mask_values: list[int] = [0, 1, 3, 8, 9, 10, 11]
    #: None: the source's own (popdask.sources.DEFAULT_RESAMPLING: bilinear for the night
    #: lights, nearest otherwise), so that a configuration written out and read back (the
    #: store's attrs, demo.yaml) reads its sources the same way
    resampling: Literal["nearest", "bilinear", "cubic", "average"] | None = None
    scale: float | None = None
    max_items: int = Field(24, gt=0)  # per tile and footprint (see above)

    @field_validator("months")
    @classmethod
    def _months(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(m < 1 or m > 12 for m in v):
            raise ValueError(f"months must be between 1 and 12, got {v}")
        return v

    @field_validator("datetime")
    @classmethod
    def _datetime(cls, v: str) -> str:
        parts = v.split("/")
        if len(parts) not in (1, 2) or not all(p for p in parts):
            raise ValueError(
                f"datetime {v!r} must be an RFC 3339 date or interval like 2021-06-01/2021-10-31"
            )
        return v

    @field_validator("subdataset")
    @classmethod
    def _subdataset(cls, v: str | None) -> str | None:
        if v is not None and "{href}" not in v and not re.match(r"^[A-Za-z0-9_]+:.", v):
            raise ValueError(
                f"subdataset {v!r} must look like DRIVER:PATH (HDF5://HDFEOS/GRIDS/...) or "
                'contain {href} (HDF4_EOS:EOS_GRID:"{href}":grid:field)'
            )
        return v

    @model_validator(mode="after")
    def _unique_bands(self) -> SourceConfig:
        names = self.bands
        dup = sorted({b for b in names if names.count(b) > 1})
        if dup:
            raise ValueError(f"band names {dup} occur twice (check assets and rename)")
        return self

    @property
    def bands(self) -> list[str]:
        """Band names in the composite: each asset key after ``rename``."""
        return [self.rename.get(a, a) for a in self.assets]


class SourcesConfig(_Model):
    sentinel2: SourceConfig
    sentinel1: SourceConfig | None = None
    nightlights: SourceConfig | None = None

    def items(self) -> list[tuple[str, SourceConfig]]:
        """``(name, config)`` of the sources in use, Sentinel-2 first."""
        out = [("sentinel2", self.sentinel2)]
        for name in ("sentinel1", "nightlights"):
            cfg = getattr(self, name)
            if cfg is not None:
                out.append((name, cfg))
        return out


class CensusConfig(_Model):
    """The 1 km census (see :mod:`popdask.census`).

    Eurostat lists populated cells only: inside the ``coverage`` a cell the file does not
    list is 0 (``absent: zero``) or, for a file partial on purpose, unknown
    (``absent: unknown``). ``coverage`` is ``region`` (the default: the whole run region is
    covered), a GeoJSON of polygons (EPSG:4326, or EPSG:3035 declared in its ``crs``; a cell
    is covered when its centre is inside; ``coverage_countries`` keeps the features whose
    ``coverage_property`` is listed), a raster (``.tif``; non-zero, non-nodata cells are
    covered), or a list of these (covered by any). ``flag_column`` marks rows confidential
    (unknown); by default ``CONFIDENTIALSTATUS`` when the file has it. ``columns`` lists
    census variables to map as layers of ``population_by`` (e.g. the Census 2021 grid's
    ``M, F, Y_LT15, Y_1564, Y_GE65``), each with the population's per-pixel weights.
    """

    path: str  # local path or fsspec URL
    column: str = "TOT_P_2021"
    storage_options: dict[str, Any] = {}
    absent: Literal["zero", "unknown"] = "zero"
    coverage: str | list[str] | None = None  # None = "region"
    coverage_countries: list[str] | None = None
    coverage_property: str = "CNTR_ID"
    flag_column: str | None = None
    #: census variables mapped with the population's weights (store ``population_by``);
    #: None: the population column alone (popdask.variables)
    columns: list[str] | None = None

    @field_validator("coverage")
    @classmethod
    def _coverage(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if isinstance(v, list) and not v:
            raise ValueError("give census.coverage as region, a file, or a non-empty list")
        for item in items:
            if item == "region":
                if isinstance(v, list):
                    raise ValueError("'region' cannot be combined with coverage files")
                continue
            suffix = Path(item.split("?")[0]).suffix.lower()
            if suffix not in (".geojson", ".json", ".tif", ".tiff", ".vrt"):
                raise ValueError(
                    f"coverage {item!r} must be 'region', polygons (.geojson) or a raster (.tif)"
                )
        return v

    @model_validator(mode="after")
    def _countries(self) -> CensusConfig:
        if self.coverage_countries is not None:
            items = [self.coverage] if isinstance(self.coverage, str) else (self.coverage or [])
            if not any(Path(i).suffix.lower() in (".geojson", ".json") for i in items):
                raise ValueError(
                    "coverage_countries needs census.coverage to be a polygon file (.geojson), "
                    "e.g. GISCO's CNTR_RG_01M_2020_4326.geojson"
                )
            if not self.coverage_countries:
                raise ValueError("coverage_countries is empty: list country ids or leave it out")
        return self


class MaskConfig(_Model):
    """Pixels where nobody can live (:mod:`popdask.mask`): a raster GDAL opens (``path``: any
    CRS; a local path or a URL the workers read) or a STAC ``collection`` (its ``asset`` of
    the items over each tile, from ``url`` or ``stac.url``), and the ``values`` that mean
    "nobody lives here" (default: any non-zero value). Applied before the census rescaling."""

    path: str | None = None
    collection: str | None = None
    url: str | None = None
    asset: str = "map"
    datetime: str | None = None
    sign: Literal["planetary_computer"] | None = None
    values: list[float] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> MaskConfig:
        if (self.path is None) == (self.collection is None):
            raise ValueError(
                "give the mask as a raster (mask.path) or a STAC collection (mask.collection)"
            )
        return self


class ModelConfig(_Model):
    """The pixel model (popdask.model). Defaults: the plain method, which no refinement beat
    across the accuracy protocol's regions by more than the spread (benchmarks/README.md)."""

    components: int = Field(12, gt=0)
    clusters: int = Field(30, ge=2)
    sample_pixels: int = Field(300_000, gt=0)
    seed: int = 0
    #: PCA scores divided by their standard deviation before the k-means (popdask.model)
    whiten: bool = False
    #: "lloyd" (full-batch, on the sample) or "minibatch" (dask-ml Incremental)
    kmeans: Literal["lloyd", "minibatch"] = "lloyd"
    #: the feature transform, "raw" or "log" (popdask.features)
    features: Literal["raw", "log"] = "raw"


class RegressionConfig(_Model):
    rescale: bool = True
    #: the densities fit (popdask.regression.fit_densities): "squared" = plain NNLS, the
    #: protocol's default; "poisson" (quasi-Poisson committee), "absolute" (robust L1)
    loss: Literal["squared", "poisson", "absolute"] = "squared"
    smooth_sigma: float = Field(3.0, ge=0)
    min_valid: float = Field(0.5, ge=0, le=1)
    #: covariates that let a cluster's density vary per pixel (popdask.terms); none by
    #: default: neither term beat the plain fit across the protocol's regions
    terms: list[Literal["intensity", "context"]] = []
    #: Gaussian sigma in metres of the neighbourhood of the context term
    context_radius: float = Field(200.0, gt=0)
    #: census cells the densities fit sees at the most (a uniform sample of the known
    #: cells beyond that: popdask.reductions); every cell of a region below it
    fit_cells: int = Field(100_000, ge=100)
    #: replicates of the spatial block bootstrap behind the intervals (popdask.uncertainty);
    #: 0: no intervals
    bootstrap: int = Field(0, ge=0)


class OutputConfig(_Model):
    """Where the store goes. With ``version`` set (e.g. ``2026-11``), each rebuild is its own
    store ``{path}/{version}.zarr`` and ``{path}/latest.json`` names the newest finished one."""

    path: str
    storage_options: dict[str, Any] = {}
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

    @property
    def store(self) -> str:
        """Path or URL of this run's Zarr store."""
        if self.version is None:
            return self.path
        return f"{self.path.rstrip('/')}/{self.version}.zarr"


class ClusterConfig(_Model):
    kind: Literal["local", "address", "gateway", "kubernetes"] = "local"
    workers: int | None = Field(None, gt=0)
    threads_per_worker: int | None = Field(None, gt=0)
    memory_limit: str | None = None
    address: str | None = None
    proxy_address: str | None = None
    auth: str | None = None
    options: dict[str, Any] = {}
    adaptive: dict[Literal["minimum", "maximum"], int] | None = None
    shutdown_on_exit: bool = True
    image: str | None = None
    resources: dict[str, Any] = {}
    namespace: str | None = None
    # kind kubernetes: each run's DaskCluster is named <name_prefix>-<10 random hex digits>
    name_prefix: str = Field("popdask", pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", max_length=42)
    #: tiles in flight per worker thread (popdask.scheduler), re-read as the cluster scales
    tiles_per_thread: float = Field(2.0, ge=1.0)
    #: replaced by tiles_per_thread (tiles are no longer submitted in batches); ignored
    batch_tiles: int | None = Field(None, gt=0)
    timeout: float = Field(300, gt=0)  # seconds to wait for a cluster and its first worker

    @model_validator(mode="after")
    def _needs(self) -> ClusterConfig:
        if self.batch_tiles is not None:
            warnings.warn(
                "cluster.batch_tiles is ignored: tiles are kept in flight as earlier ones "
                "finish; set cluster.tiles_per_thread (default 2) instead",
                FutureWarning,
                stacklevel=2,
            )
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind 'address' needs cluster.address: tcp://HOST:8786")
        return self


class Config(_Model):
    region: RegionConfig
    grid: GridConfig = GridConfig()
    stac: StacConfig = StacConfig()
    sources: SourcesConfig
    census: CensusConfig
    mask: MaskConfig | None = None
    model: ModelConfig = ModelConfig()
    regression: RegressionConfig = RegressionConfig()
    output: OutputConfig
    cluster: ClusterConfig = ClusterConfig()
    read: ReadConfig = ReadConfig()

    @model_validator(mode="after")
    def _no_secrets(self) -> Config:
        refuse_storage_secrets(self.output.storage_options, "output.storage_options")
        refuse_storage_secrets(self.census.storage_options, "census.storage_options")
        return self

    @model_validator(mode="after")
    def _mask_url(self) -> Config:
        if self.mask is not None and self.mask.collection and not (self.mask.url or self.stac.url):
            raise ValueError("mask.collection has no STAC API: set stac.url, or mask.url")
        return self

    @model_validator(mode="after")
    def _urls(self) -> Config:
        for name, src in self.sources.items():
            if not (src.url or self.stac.url):
                raise ValueError(
                    f"sources.{name} has no STAC API: set stac.url, or sources.{name}.url"
                )
        return self

    def make_grid(self) -> Grid:
        """The :class:`~popdask.grid.Grid` of this run."""
        g = self.grid
        return Grid.from_bbox(
            self.region.bbox_3035(), resolution=g.resolution, cell=g.cell, tile=g.tile
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what the store records in its attrs)."""
        return self.model_dump(mode="json")


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def _is_url(path: str) -> bool:
    return "://" in path


def config_from_dict(
    data: dict[str, Any],
    *,
    overrides: list[str] = (),
    base_dir: Path | None = None,
    name: str = "config",
) -> Config:
    """Validate a configuration held in a dict.

    Parameters
    ----------
    data
        The parsed YAML mapping. Catalog presets (``stac.preset``, ``sources.NAME.preset``)
        are expanded after the overrides and before validation (:mod:`popdask.presets`).
    overrides
        ``"section.key=value"`` strings; values are parsed as YAML (``model.clusters=50``).
    base_dir
        Folder against which relative ``census.path``, ``census.coverage`` and
        ``output.path`` are resolved.
    name
        What to call the configuration in error messages (usually its file name).

    Raises
    ------
    ConfigError
        With one line per problem, naming the key.
    """
    data = copy.deepcopy(dict(data or {}))  # overrides must not change the caller's dicts
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, _, raw = item.partition("=")
        _set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        data = expand_presets(data)
    except PresetError as e:
        raise ConfigError(f"{name}: {e}") from None
    if base_dir is not None:
        for section in ("census", "output", "mask"):
            sec = data.get(section)
            if isinstance(sec, dict) and isinstance(sec.get("path"), str):
                p = sec["path"]
                if not _is_url(p) and not os.path.isabs(p):
                    data[section] = {**sec, "path": str((base_dir / p).resolve())}
        sec = data.get("census")
        if isinstance(sec, dict) and isinstance(sec.get("coverage"), (str, list)):
            cov = sec["coverage"]

            def _abs(p: Any) -> Any:
                if not isinstance(p, str) or p == "region" or _is_url(p) or os.path.isabs(p):
                    return p
                return str((base_dir / p).resolve())

            cov = _abs(cov) if isinstance(cov, str) else [_abs(c) for c in cov]
            data["census"] = {**sec, "coverage": cov}
    try:
        cfg = Config.model_validate(data)
        cfg.make_grid()
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling against DESIGN.md's run configuration)"
            elif err["type"] == "missing" and loc.endswith(".datetime"):
                msg = (
                    "required: the dates to composite, e.g. datetime: 2021-06-01/2021-10-31 "
                    "(a preset gives the catalog, never the dates)"
                )
            lines.append(f"{name}: {loc}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read and validate a YAML run configuration.

    Examples
    --------
    >>> cfg = load_config("run.yaml", ["model.clusters=50"])  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (region, sources, ...)")
    return config_from_dict(
        data, overrides=overrides, base_dir=path.parent.resolve(), name=str(path)
    )
