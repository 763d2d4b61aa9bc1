"""GDAL settings for cloud reads (popdask.gdal): built from the ``read`` section, picklable."""

from __future__ import annotations

import pickle

import pytest
import rasterio
from rasterio.env import get_gdal_config

from popdask.config import ReadConfig
from popdask.gdal import (
    BASE_OPTIONS,
    GdalConfigError,
    forget,
    gdal_env,
    gdal_options,
    s3_endpoint_options,
    vsi_prefix,
)


def test_defaults_have_no_listing_retries_ranges_and_a_cache():
    opts = gdal_options(None)
    assert opts == gdal_options(ReadConfig()) == BASE_OPTIONS
    assert opts["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert int(opts["GDAL_HTTP_MAX_RETRY"]) >= 3 and float(opts["GDAL_HTTP_RETRY_DELAY"]) > 0
    assert opts["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    assert opts["GDAL_HTTP_MULTIRANGE"] == "YES"
    assert opts["VSI_CACHE"] == "TRUE" and int(opts["CPL_VSIL_CURL_CACHE_SIZE"]) > 0
    assert not any(k.startswith("AWS_") for k in opts)


@pytest.mark.parametrize(
    ("endpoint", "host", "https"),
    [
        ("http://127.0.0.1:9000", "127.0.0.1:9000", "NO"),
        ("http://127.0.0.1:9000/", "127.0.0.1:9000", "NO"),
        ("https://s3.example.eu", "s3.example.eu", "YES"),
        ("minio.internal:9000", "minio.internal:9000", "YES"),
    ],
)
def test_s3_endpoint_becomes_host_https_and_path_style(endpoint, host, https):
    opts = gdal_options(ReadConfig(s3_endpoint=endpoint))
    assert opts["AWS_S3_ENDPOINT"] == host
    assert opts["AWS_HTTPS"] == https
    assert opts["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert "AWS_REQUEST_PAYER" not in opts


@pytest.mark.parametrize("endpoint", ["ftp://host:21", "http://host:9000/bucket", "http://"])
def test_bad_s3_endpoint_is_a_clear_error(endpoint):
    with pytest.raises(GdalConfigError, match=r"read\.s3_endpoint"):
        s3_endpoint_options(endpoint)


def test_requester_pays_and_extra_options_win():
    read = ReadConfig(
        requester_pays=True, gdal={"GDAL_HTTP_MAX_RETRY": "9", "AWS_REGION": "eu-central-1"}
    )
    opts = gdal_options(read)
    assert opts["AWS_REQUEST_PAYER"] == "requester"
    assert opts["GDAL_HTTP_MAX_RETRY"] == "9" and opts["AWS_REGION"] == "eu-central-1"
    # the dict form (as stored in the run's attrs) gives the same
    assert gdal_options(read.model_dump()) == opts


@pytest.mark.parametrize(
    "option",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "GS_SECRET_ACCESS_KEY",
        "GS_OAUTH2_REFRESH_TOKEN",
        "GS_OAUTH2_CLIENT_SECRET",
        "GS_OAUTH2_PRIVATE_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_SAS",
        "OSS_SECRET_ACCESS_KEY",
        "SWIFT_AUTH_TOKEN",
        "SWIFT_KEY",
        "GDAL_HTTP_USERPWD",
        "GDAL_HTTP_AUTH",
        "GDAL_HTTP_HEADERS",
        "GDAL_HTTP_BEARER",
    ],
)
def test_credentials_are_refused_in_the_configuration(option):
    """Every cloud storage GDAL reads: the option is refused in the YAML and in the options
    made from a stored configuration (a plain dict)."""
    from popdask.config import ConfigError, config_from_dict

    with pytest.raises(GdalConfigError, match=option):
        gdal_options({"gdal": {option: "x"}})
    base = {
        "region": {"bbox": [4321000, 3210000, 4323000, 3212000]},
        "stac": {"url": "http://127.0.0.1:1"},
        "sources": {"sentinel2": {"collection": "c", "datetime": "2021", "assets": ["B02"]}},
        "census": {"path": "c.csv"},
        "output": {"path": "o.zarr"},
    }
    with pytest.raises(ConfigError, match=f"{option}.*environment"):
        config_from_dict({**base, "read": {"gdal": {option: "x"}}})


@pytest.mark.parametrize(
    "option",
    ["AWS_REGION", "AWS_S3_ENDPOINT", "GDAL_HTTP_MAX_RETRY", "AZURE_STORAGE_ACCOUNT",
     "GDAL_HTTP_HEADER_FILE", "AWS_NO_SIGN_REQUEST", "CPL_VSIL_CURL_ALLOWED_EXTENSIONS"],
)  # fmt: skip
def test_settings_that_are_not_credentials_pass(option):
    assert gdal_options({"gdal": {option: "x"}})[option] == "x"


def test_env_travels_pickled_and_applies_around_opens_and_reads():
    env = pickle.loads(pickle.dumps(gdal_env(ReadConfig(s3_endpoint="http://127.0.0.1:9000"))))
    with env.open:
        assert get_gdal_config("AWS_S3_ENDPOINT") == "127.0.0.1:9000"
        assert get_gdal_config("GDAL_DISABLE_READDIR_ON_OPEN") == "EMPTY_DIR"
        assert get_gdal_config("VSI_CACHE") is True
    with env.read:
        assert get_gdal_config("AWS_VIRTUAL_HOSTING") == "FALSE"
        assert get_gdal_config("VSI_CACHE") is False  # stackstac's layer: blocks bypass it
    with rasterio.Env():
        assert get_gdal_config("AWS_S3_ENDPOINT") is None  # nothing leaks out


def test_forget_targets_the_gdal_path_without_query():
    assert vsi_prefix("https://h.example/a/b.tif?sig=1") == "/vsicurl/https://h.example/a/b.tif"
    assert vsi_prefix("s3://bucket/k/b.tif") == "/vsis3/bucket/k/b.tif"
    assert vsi_prefix('HDF5:"/vsicurl/https://h/f.h5"://grid/x') == "/vsicurl/https://h/f.h5"
    assert vsi_prefix("/data/local.tif") is None
    assert forget("/data/local.tif") is False
    assert forget("http://127.0.0.1:9/never/read.tif") is True  # GDAL reached via ctypes
