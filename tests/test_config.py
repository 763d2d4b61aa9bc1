import pytest
import yaml

from popdask.config import ConfigError, config_from_dict, load_config

BASE = {
    "region": {"bbox": [4321000, 3210000, 4341000, 3230000]},
    "stac": {"url": "http://127.0.0.1:1/api"},
    "sources": {
        "sentinel2": {
            "collection": "sentinel-2-l2a",
            "datetime": "2021-06-01/2021-10-31",
            "assets": ["B02", "B03", "B04"],
            "mask_asset": "SCL",
        },
        "nightlights": {
            "url": "http://127.0.0.1:2",
            "collection": "viirs",
            "datetime": "2021-01-01/2021-12-31",
            "assets": ["rad"],
        },
    },
    "census": {"path": "grid.csv"},
    "output": {"path": "out.zarr"},
}


def test_defaults_and_relative_paths(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p)
    assert cfg.model.clusters == 30 and cfg.grid.tile == 10000 and cfg.cluster.kind == "local"
    assert (cfg.model.features, cfg.model.whiten, cfg.model.kmeans) == ("raw", False, "lloyd")
    assert cfg.census.column == "TOT_P_2021"
    assert cfg.census.path == str(tmp_path / "grid.csv")
    assert cfg.output.path == str(tmp_path / "out.zarr")
    assert [n for n, _ in cfg.sources.items()] == ["sentinel2", "nightlights"]
    assert cfg.make_grid().shape == (1000, 1000)


def test_overrides_are_yaml_values(tmp_path):
    cfg = config_from_dict(
        BASE,
        overrides=[
            "model.clusters=40",
            "output.path=s3://b/run.zarr",
            "cluster.kind=address",
            "cluster.address=tcp://h:1",
        ],
    )
    assert cfg.model.clusters == 40
    assert cfg.output.path == "s3://b/run.zarr"
    assert cfg.cluster.address == "tcp://h:1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"clusters": 1}}, "model.clusters"),
        ({"region": {}}, "exactly one of region.bbox"),
        (
            {
                "sources": {
                    "sentinel2": {
                        "collection": "x",
                        "datetime": "2021",
                        "assets": ["a"],
                        "months": [13],
                    }
                }
            },
            "months must be between 1 and 12",
        ),
        ({"modle": {}}, "modle: unknown key"),
        ({"stac": {}}, "sources.sentinel2 has no STAC API"),
        ({"grid": {"tile": 1500}}, "multiple of grid.cell"),
        ({"cluster": {"kind": "address"}}, "needs cluster.address"),
    ],
)
def test_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **change}, name="run.yaml")


def test_bbox_lonlat_is_transformed():
    data = {**BASE, "region": {"bbox_lonlat": [9.99, 51.99, 10.01, 52.01]}}
    bounds = config_from_dict(data).make_grid().bounds
    assert bounds[0] < 4321000 < bounds[2] and bounds[1] < 3210000 < bounds[3]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")


def test_terms_default_and_what_the_bands_allow():
    from popdask.pipeline import active_terms

    # no term by default (the accuracy protocol adopted neither); both stay available
    assert config_from_dict(BASE).regression.terms == []
    assert config_from_dict(BASE).regression.loss == "squared"  # plain NNLS
    with pytest.raises(ConfigError, match="loss"):
        config_from_dict({**BASE, "regression": {"loss": "huber"}})
    cfg = config_from_dict({**BASE, "regression": {"terms": ["intensity", "context"]}})
    assert cfg.regression.context_radius == 200.0
    s2, s1, lights = ["reflectance"] * 11, ["backscatter_db"] * 2, ["radiance"]
    assert active_terms(cfg, s2 + s1 + lights) == ["intensity", "context"]
    assert active_terms(cfg, s2 + lights) == ["intensity", "context"]  # lights alone
    assert active_terms(cfg, s2) == ["context"]  # Sentinel-2 only: no intensity
    plain = config_from_dict({**BASE, "regression": {"terms": []}})
    assert active_terms(plain, s2 + s1 + lights) == []
    with pytest.raises(ConfigError, match="terms"):
        config_from_dict({**BASE, "regression": {"terms": ["height"]}})
    with pytest.raises(ConfigError, match="context_radius"):
        config_from_dict({**BASE, "regression": {"context_radius": 0}})


def test_census_absent_and_coverage_keys(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(BASE))
    c = load_config(p).census
    assert (c.absent, c.coverage, c.coverage_countries, c.flag_column) == ("zero", None, None, None)
    census = {
        "path": "grid.csv",
        "column": "T",
        "absent": "unknown",
        "coverage": "gisco/CNTR_RG_01M_2020_4326.geojson",
        "coverage_countries": ["BE", "NL"],
        "flag_column": "CONFIDENTIALSTATUS",
    }
    p.write_text(yaml.safe_dump({**BASE, "census": census}))
    c = load_config(p).census
    assert c.absent == "unknown" and c.coverage_countries == ["BE", "NL"]
    assert c.coverage == str(tmp_path / "gisco" / "CNTR_RG_01M_2020_4326.geojson")
    cfg = config_from_dict(BASE, overrides=["census.coverage=[land.tif, s3://b/c.geojson]"])
    assert cfg.census.coverage == ["land.tif", "s3://b/c.geojson"]
    assert config_from_dict(BASE, overrides=["census.coverage=region"]).census.coverage == "region"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("census.absent=nan", "census.absent: Input should be 'zero' or 'unknown'"),
        ("census.coverage=countries.shp", "census.coverage: coverage 'countries.shp' must be"),
        ("census.coverage=[]", "census.coverage: give census.coverage as region"),
        ("census.coverage_countries=[BE]", "coverage_countries needs census.coverage to be a"),
        ("census.covrage=region", "census.covrage: unknown key"),
    ],
)
def test_census_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config_from_dict(BASE, overrides=[override])


def test_batch_tiles_of_older_configurations_is_ignored_with_a_warning():
    with pytest.warns(FutureWarning, match="tiles_per_thread"):
        cfg = config_from_dict({**BASE, "cluster": {"batch_tiles": 40}})
    assert cfg.cluster.tiles_per_thread == 2.0
    assert (
        config_from_dict({**BASE, "cluster": {"tiles_per_thread": 3}}).cluster.tiles_per_thread == 3
    )
    with pytest.raises(ConfigError, match="tiles_per_thread"):
        config_from_dict({**BASE, "cluster": {"tiles_per_thread": 0.5}})


@pytest.mark.parametrize(
    ("section", "options", "named", "hint"),
    [
        ("output", {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value"}, "secret", "AWS_SECRET"),
        ("output", {"client_kwargs": {"aws_secret_access_key": "s3cr3t-value"}}, "client_kwargs",
         "AWS_SECRET"),
        ("output", {"account_key": "s3cr3t-value"}, "account_key", "AZURE_STORAGE_ACCOUNT_KEY"),
        ("output", {"connection_string": "s3cr3t-value"}, "connection_string", "AZURE"),
        ("output", {"sas_token": "s3cr3t-value"}, "sas_token", "AZURE_STORAGE_SAS_TOKEN"),
        ("census", {"password": "s3cr3t-value"}, "password", "environment"),
        ("census", {"token": "s3cr3t-value"}, "token", "GOOGLE_APPLICATION_CREDENTIALS"),
    ],
)  # fmt: skip
def test_credentials_in_storage_options_are_refused(section, options, named, hint):
    cfg = {**BASE, section: {**BASE[section], "storage_options": options}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    msg = str(e.value)
    assert f"{section}.storage_options." in msg and named in msg and hint in msg
    assert "s3cr3t-value" not in msg  # the value itself is never shown


def test_credentials_given_with_set_are_refused_and_modes_pass(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=r"output\.storage_options\.secret"):
        load_config(path, ["output.storage_options={secret: s3cr3t-value}"])
    ok = load_config(
        path, ["output.storage_options={anon: true, endpoint_url: 'http://127.0.0.1:9'}"]
    )
    assert ok.output.storage_options["anon"] is True
    gcs = load_config(path, ["census.storage_options={token: anon}"])
    assert gcs.census.storage_options == {"token": "anon"}


def test_a_configuration_written_out_reads_its_sources_the_same_way():
    """The night lights are warped bilinearly unless a resampling is set; a configuration
    written out (the store's attrs, demo.yaml) and read back must not turn that into the
    nearest neighbour the other sources use (it did: the default was spelled "nearest")."""
    from popdask.sources import resampling_of

    cfg = config_from_dict(BASE)
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    for c in (cfg, again):
        assert resampling_of("nightlights", c.sources.nightlights) == "bilinear"
        assert resampling_of("sentinel2", c.sources.sentinel2) == "nearest"
    nearest = {**BASE, "sources": {**BASE["sources"], "nightlights": {
        **BASE["sources"]["nightlights"], "resampling": "nearest"}}}  # fmt: skip
    cfg = config_from_dict(yaml.safe_load(yaml.safe_dump(config_from_dict(nearest).to_dict())))
    assert resampling_of("nightlights", cfg.sources.nightlights) == "nearest"
