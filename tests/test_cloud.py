"""Cloud reads and writes against the real servers on loopback: pgstac, nginx, S3 (moto).

- a pgstac STAC API (PostgreSQL + PostGIS + pgstac, served by stac-fastapi-pgstac) holding
  the demo items, their hrefs pointing at nginx;
- nginx serving the demo COGs with Range requests and an access log of the bytes sent;
- moto's S3 server, holding COGs read by GDAL (/vsis3) and the Zarr output (s3fs).

The runs use the same hand-written configuration as ``tests/conftest.py`` and the session
dask cluster, and must give the same store as the local-file run (``clean_run``).
Servers come from ``tests/servers.py``; the Debian ones are installed by ``.ci/services``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import write_config
from servers import (
    FaultyProxy,
    MotoServer,
    NginxServer,
    PgstacApi,
    PostgresServer,
    missing_services,
    set_env,
)

from popdask import cli, store
from popdask.config import ReadConfig, load_config
from popdask.sources import SourceError, load_stack, open_catalog, region_lonlat, search_source
from popdask.synthetic import rewrite_hrefs

_MISSING = missing_services()
if _MISSING:
    _WHY = "the cloud tests need " + "; ".join(_MISSING)
    if os.environ.get("CI"):
        raise RuntimeError(_WHY + " (CI runs .ci/services first)")
    pytest.skip(_WHY, allow_module_level=True)

pytestmark = pytest.mark.integration

AWS_ENV = {
    # moto accepts any key; clients must sign. Never in the configuration.
    "AWS_ACCESS_KEY_ID": "popdask-test",
    "AWS_SECRET_ACCESS_KEY": "popdask-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service
}
CELL = (4323000, 3212000, 4324000, 3213000)  # one 1 km census cell inside the demo region
OUT_BUCKET = "popdask-out"
COG_BUCKET = "popdask-cogs"


# --------------------------------------------------------------------------------------
# Servers (module scope: each started once, stopped at the end of the module)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nginx(demo_region):
    """nginx serving the demo region's folder (COGs) on loopback."""
    with NginxServer(demo_region.root) as server:
        yield server


@pytest.fixture(scope="module")
def http_items(demo_region, nginx, tmp_path_factory) -> dict[str, Path]:
    """The demo items with their hrefs moved to nginx, by collection."""
    out = tmp_path_factory.mktemp("items-http")
    return {
        cid: rewrite_hrefs(path, nginx.url, out / path.name, root=demo_region.root)
        for cid, path in demo_region.items.items()
    }


@pytest.fixture(scope="module")
def pgstac_api(demo_region, http_items):
    """A pgstac STAC API (stac-fastapi-pgstac) with the demo items (hrefs on nginx)."""
    with (
        PostgresServer() as pg,
        PgstacApi(pg, list(demo_region.collections.values()), list(http_items.values())) as api,
    ):
        yield api.url


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server on loopback, with the output bucket."""
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def client(dask_cluster):
    from distributed import Client

    with Client(dask_cluster, set_as_default=False) as c:
        yield c


@pytest.fixture
def aws_env(monkeypatch, client, moto):
    """S3 credentials in the environment of this process and of the dask workers.

    As on a real deployment the workers' own environment holds the credentials (the
    session cluster was started before, so they are set there with ``client.run``).
    """
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)

    before = client.run(set_env, AWS_ENV)
    s3 = moto.client()
    for bucket in (OUT_BUCKET, COG_BUCKET):
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
    yield moto
    for worker, old in before.items():
        client.run(set_env, old, workers=[worker])


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _items(path: Path, collection: str | None = None):
    import pystac

    items = [pystac.Item.from_dict(json.loads(line)) for line in path.read_text().splitlines()]
    return [it for it in items if collection is None or it.collection_id == collection]


def _fetched(requests, root: Path) -> tuple[int, int, set[str]]:
    """(bytes sent, total size of the files touched, paths) for the logged GETs."""
    paths = {r.path for r in requests if r.method == "GET"}
    sent = sum(r.body_bytes for r in requests if r.method == "GET")
    size = sum((root / p.lstrip("/")).stat().st_size for p in paths)
    return sent, size, paths


def _recorded(path: str, storage_options=None) -> dict[str, list[str]]:
    """``{tile id: ids of the Sentinel-2 items it composited}`` from the store's records."""
    import fsspec

    from popdask import catalog

    fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    names = fs.glob(f"{root.rstrip('/')}/catalog/sentinel2/*.ndjson.gz")
    tiles = sorted(n.rsplit("/", 1)[1].split(".")[0] for n in names)
    assert tiles, f"no catalog record in {path}"
    return {
        t: [it["id"] for it in catalog.load_tile_items(path, "sentinel2", t, storage_options).items]
        for t in tiles
    }


def _assert_same_store(path: str, reference: Path, storage_options=None) -> None:
    """The run at ``path`` equals the local-file run: labels exactly, population to 1e-5."""
    ref = xr.open_zarr(reference)
    got = store.open_store(path, storage_options)
    assert (got.tile_status.values == store.COMPLETE).all()
    np.testing.assert_array_equal(got.cluster.values, ref.cluster.values)
    np.testing.assert_allclose(got.population.values, ref.population.values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got.composite.values, ref.composite.values)
    assert _recorded(path, storage_options) == _recorded(str(reference))
    # the model and the fit, written whole by chunkio, read back through zarr
    for group in ("model", "regression"):
        arrays, attrs = store.load_arrays(path, group, storage_options)
        want, want_attrs = store.load_arrays(str(reference), group)
        assert sorted(arrays) == sorted(want) and attrs.keys() == want_attrs.keys()
        for name, value in want.items():
            np.testing.assert_allclose(arrays[name], value, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------
# pgstac: the query extension is used, and the results match rustac's
# --------------------------------------------------------------------------------------
def test_pgstac_conforms_to_query_and_finds_what_rustac_finds(
    pgstac_api, stac_api, demo_region, tmp_path, dask_cluster
):
    client = open_catalog(pgstac_api, retries=1, timeout=10)
    assert client.conforms_to("QUERY") and client.conforms_to("FILTER")
    assert not open_catalog(stac_api, retries=1, timeout=10).conforms_to("QUERY")

    cfg = load_config(
        write_config(tmp_path, url=stac_api, census=demo_region.census, address=dask_cluster)
    )
    bbox = region_lonlat(cfg.make_grid())
    for name, src in cfg.sources.items():
        for cloud in (src.max_cloud_cover, 30.0) if src.max_cloud_cover else (None,):
            src = src.model_copy(update={"max_cloud_cover": cloud})
            pg = search_source(name, src, url=pgstac_api, bbox_lonlat=bbox)
            ru = search_source(name, src, url=stac_api, bbox_lonlat=bbox)
            assert pg.items, (name, cloud)
            assert [it.id for it in pg.items] == [it.id for it in ru.items], (name, cloud)
            if cloud == 30.0:
                # rustac has no query extension: popdask dropped the cloudy items itself;
                # pgstac got the `query` and never returned them
                assert ru.skipped.get("cloud_cover", 0) > 0
                assert "cloud_cover" not in pg.skipped


# --------------------------------------------------------------------------------------
# HTTP range reads through nginx
# --------------------------------------------------------------------------------------
def test_window_read_over_http_is_ranged_and_equal_to_local(nginx, http_items, demo_region, client):
    """One 1 km cell of every demo asset, over HTTP on the dask workers: range requests
    only, no directory listing or sidecar probes, the same pixels as from local files."""
    assets = {
        "sentinel-2-l2a": ["B02", "B04", "B08", "B11", "SCL"],
        "sentinel-1-rtc": ["vv", "vh"],
        "viirs-nightlights": ["avg_rad"],
    }
    since = nginx.log_offset()
    t0 = time.perf_counter()
    for cid, keys in assets.items():
        remote = load_stack(
            _items(http_items[cid]), keys, bounds=CELL, resolution=20, read=ReadConfig()
        )
        local = load_stack(_items(demo_region.items[cid]), keys, bounds=CELL, resolution=20)
        got = client.compute(remote.data).result()
        want = local.data.compute(scheduler="threads")
        np.testing.assert_array_equal(got, want)
        assert np.isfinite(got).any()
    seconds = time.perf_counter() - t0
    reqs = nginx.requests(since)
    assert reqs, "nothing was read over HTTP"
    sent, size, paths = _fetched(reqs, demo_region.root)
    assert all(p.endswith(".tif") for p in paths), sorted(p for p in paths if ".tif" not in p)
    # GDAL asks each file's size once (HEAD, no body), then reads ranges (206) only
    heads = [r.path for r in reqs if r.method == "HEAD"]
    assert len(heads) == len(set(heads)) and all(
        r.status == 200 for r in reqs if r.method == "HEAD"
    )
    gets = [r for r in reqs if r.method == "GET"]
    assert all(r.status == 206 and r.range.startswith("bytes=") for r in gets), gets[:5]
    assert {r.method for r in reqs} <= {"GET", "HEAD"}
    print(
        f"\ndemo COGs, one 1 km cell: {len(reqs)} requests, {len(paths)} files, {sent} of "
        f"{size} bytes ({sent / size:.1%}) in {seconds:.2f} s"
    )


@pytest.fixture(scope="module")
def big_cogs(tmp_path_factory, demo_region):
    """Two Sentinel-2-sized COGs (4096² px at 20 m, 512 px blocks, UTM 32N) around the
    demo region, each asset of one item, served by their own nginx.

    The demo's COGs are tiny (1.4–130 KB: GDAL's first read of 16 KB is most of a file),
    so the share of a file a small window costs is measured on files of a realistic size.
    """
    import pystac
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import from_origin

    root = tmp_path_factory.mktemp("big-cogs")
    to_utm = Transformer.from_crs(3035, 32632, always_xy=True)
    cx, cy = to_utm.transform(*(sum(demo_region.bbox[i::2]) / 2 for i in (0, 1)))
    n, res = 4096, 20.0
    x0, y1 = round(cx / res) * res - n * res / 2, round(cy / res) * res + n * res / 2
    transform = from_origin(x0, y1, res, res)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    hrefs = {}
    for k, band in enumerate(("B04", "B08")):
        field = 1500 + 600 * np.sin(x / (37 + k)) * np.cos(y / 53) + 300 * np.sin((x + y) / 211)
        data = (field + rng.normal(0, 30, (n, n))).clip(1, 10000).astype(np.uint16)
        path = root / f"{band}.tif"
        with rasterio.open(
            path,
            "w",
            driver="COG",
            width=n,
            height=n,
            count=1,
            dtype="uint16",
            crs="EPSG:32632",
            transform=transform,
            nodata=0,
            compress="DEFLATE",
            predictor=2,
            level=1,
            blocksize=512,
            overviews="AUTO",
        ) as ds:
            ds.write(data, 1)
        hrefs[band] = path.name
    del x, y
    to_ll = Transformer.from_crs(32632, 4326, always_xy=True)
    west, south, east, north = to_ll.transform_bounds(x0, y1 - n * res, x0 + n * res, y1)
    with NginxServer(root) as server:
        item = pystac.Item(
            "S2X_MSIL2A_20210701_big",
            geometry={
                "type": "Polygon",
                "coordinates": [
                    [[west, south], [east, south], [east, north], [west, north], [west, south]]
                ],
            },
            bbox=[west, south, east, north],
            datetime=datetime.datetime(2021, 7, 1, 10, 30, tzinfo=datetime.UTC),
            properties={
                "proj:epsg": 32632,
                "proj:shape": [n, n],
                "proj:transform": list(transform)[:6],
            },
        )
        for band, name in hrefs.items():
            item.add_asset(band, pystac.Asset(f"{server.url}/{name}", media_type="image/tiff"))
        yield server, root, [item]


def test_small_window_fetches_a_small_share_of_each_file(big_cogs, client):
    server, root, items = big_cogs
    since = server.log_offset()
    cube = load_stack(items, ["B04", "B08"], bounds=CELL, resolution=20, read=ReadConfig())
    data = client.compute(cube.data).result()
    assert data.shape == (1, 2, 50, 50) and np.isfinite(data).all()
    reqs = server.requests(since)
    sent, size, paths = _fetched(reqs, root)
    assert paths == {"/B04.tif", "/B08.tif"}
    assert all(r.status == 206 and r.range != "-" for r in reqs if r.method == "GET"), reqs
    assert sum(r.method == "HEAD" for r in reqs) <= 2
    print(
        f"\n4096² COGs, one 1 km cell: {len(reqs)} requests "
        f"{[(r.method, r.range, r.body_bytes) for r in reqs]}, {sent} of {size} bytes "
        f"({sent / size:.2%})"
    )
    assert sent <= 0.10 * size


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------
def test_run_pgstac_nginx_to_s3_equals_local_run(
    tmp_path,
    demo_region,
    pgstac_api,
    nginx,
    aws_env,
    dask_cluster,
    clean_run,
    capsys,
    caplog,
    monkeypatch,
):
    """`popdask run` searching pgstac, reading COGs from nginx, writing a versioned Zarr
    store to S3; the result equals the local-file run's. The credentials, in the client's
    environment, are nowhere in the store, the output, the logs or the task graphs sent to
    the scheduler."""
    from distributed import Client
    from distributed.protocol import dumps

    sent: list[bytes] = []
    send = Client._send_to_scheduler

    def spy(self, msg):  # every message to the scheduler, as it goes on the wire
        sent.append(b"".join(bytes(f) for f in dumps(msg)))
        return send(self, msg)

    monkeypatch.setattr(Client, "_send_to_scheduler", spy)
    cfg_path = write_config(
        tmp_path, url=pgstac_api, census=demo_region.census, address=dask_cluster
    )
    base = f"s3://{OUT_BUCKET}/run"
    so = {"endpoint_url": aws_env.endpoint}
    since = nginx.log_offset()
    sets = [f"output.path={base}", "output.version=v1", f"output.storage_options={json.dumps(so)}"]
    argv = ["run", str(cfg_path), "--report-dir", str(tmp_path)]
    with caplog.at_level(logging.DEBUG, logger="popdask"):
        assert cli.main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    url = f"{base}/v1.zarr"
    _assert_same_store(url, clean_run.parent / "out.zarr", so)
    assert store.latest(base, so) == url
    reqs = nginx.requests(since)
    assert reqs and all(r.status == 206 for r in reqs if r.method == "GET")
    # the store is on S3 (and nowhere local), readable with the CLI too
    assert not list(tmp_path.glob("*.zarr"))
    s3 = aws_env.client()
    assert s3.head_object(Bucket=OUT_BUCKET, Key="run/v1.zarr/.zattrs")["ContentLength"] > 0
    assert s3.list_objects_v2(Bucket=OUT_BUCKET, Prefix="run/v1.zarr/population/")["KeyCount"]
    printed = capsys.readouterr()
    assert cli.main(["status", url, "--storage-options", json.dumps(so)]) == 0
    assert "4 complete" in capsys.readouterr().out
    # the credentials came from the environment; none is in the store, the output or logs
    secrets = [AWS_ENV["AWS_SECRET_ACCESS_KEY"].encode(), AWS_ENV["AWS_ACCESS_KEY_ID"].encode()]
    listing = s3.list_objects_v2(Bucket=OUT_BUCKET, Prefix="run/")
    assert listing["KeyCount"] > 0 and not listing["IsTruncated"]
    for obj in listing["Contents"]:
        body = s3.get_object(Bucket=OUT_BUCKET, Key=obj["Key"])["Body"].read()
        assert not any(x in body for x in secrets), obj["Key"]
    for text in (printed.out, printed.err, caplog.text):
        assert not any(x.decode() in text for x in secrets)
    graphs = [m for m in sent if b"update-graph" in m]
    assert len(graphs) > 20  # the tiles' tasks of every pass
    # the tasks' arguments are plain in these bytes (the store's URL is): so would a secret be
    assert sum(OUT_BUCKET.encode() in m for m in graphs) > 20
    assert not any(x in m for m in sent for x in secrets)


def test_object_store_faults_during_the_passes_are_retried_or_fail_their_tile_and_pass(
    tmp_path, demo_region, pgstac_api, nginx, aws_env, client, dask_cluster, clean_run, capsys
):
    """The store on S3 behind a proxy that answers 503 SlowDown to every 4th request for the
    tiles' chunks (reads and writes, every pass) and to every write of one tile's
    ``population`` chunk. The passing faults are retried; the lasting one fails that tile in
    the predict pass only (its composite and labels stay done), never as fill data; once the
    store answers again, a rerun finishes only that tile's predict and equals the clean run."""
    proxy = FaultyProxy(
        aws_env.endpoint,
        match=r"^/popdask-out/faulty\.zarr/(composite|cluster|population|density|terms)/",
        every=4,
    )
    proxy.always.add(("PUT", r"/faulty\.zarr/population/0\.0$"))
    old = client.run(set_env, {"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"})
    url, so = f"s3://{OUT_BUCKET}/faulty.zarr", {"endpoint_url": proxy.url}
    cfg_path = write_config(
        tmp_path, url=pgstac_api, census=demo_region.census, address=dask_cluster
    )
    sets = [f"output.path={url}", f"output.storage_options={json.dumps(so)}"]
    argv = ["run", str(cfg_path), "--report-dir", str(tmp_path)]
    argv += [x for s in sets for x in ("--set", s)]
    try:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "failed in the predict pass" in err and "N" in err
        status = store.tile_status(url, so)
        assert status[0, 0] == store.failed_code(store.COMPLETE)  # -3: predict failed
        assert (status.ravel()[1:] == store.COMPLETE).all()
        failed = store.root_attrs(url, so)["failed_predict"]
        assert list(failed) == [load_config(cfg_path).make_grid().tiles()[0].id]
        assert "population/0.0" in next(iter(failed.values()))
        refused = {(m, p.split("/")[3]) for m, p in proxy.refused}
        # the passing faults hit reads and writes of every pass's arrays
        assert {("PUT", "composite"), ("PUT", "cluster"), ("GET", "composite")} <= refused
        ref = xr.open_zarr(clean_run.parent / "out.zarr")
        got = store.open_store(url, so)
        np.testing.assert_array_equal(got.composite.values, ref.composite.values)
        np.testing.assert_array_equal(got.cluster.values, ref.cluster.values)

        # the store answers again (the client's own reads through zarr, for the quicklook,
        # rely on botocore's retries only: the passing faults stop too)
        proxy.always.clear()
        proxy.every = 0
        since = len(proxy.requests)
        assert cli.main(argv) == 0
        puts = {p.split("/")[3] for m, p in proxy.requests[since:] if m == "PUT"}
        assert "population" in puts and not puts & {"composite", "cluster"}  # predict only
        _assert_same_store(url, clean_run.parent / "out.zarr", so)
        assert store.root_attrs(url, so)["failed_predict"] == {}
    finally:
        proxy.close()
        for worker, env in old.items():
            client.run(set_env, env, workers=[worker])


def test_missing_bucket_is_one_clear_line(tmp_path, demo_region, aws_env, capsys):
    from popdask.census import read_census

    cfg = load_config(
        write_config(tmp_path, url="http://unused", census=demo_region.census, address="x:1")
    )
    grid = cfg.make_grid()
    url = "s3://popdask-no-such-bucket/run.zarr"
    with pytest.raises(store.StoreError, match=re.escape(url)) as err:
        store.create(
            url,
            grid,
            bands=["B04"],
            kinds=["reflectance"],
            census=read_census(cfg.census.path, grid, column=cfg.census.column),
            attrs={},
            storage_options={"endpoint_url": aws_env.endpoint},
        )
    assert "bucket" in str(err.value) and "\n" not in str(err.value)


def test_run_reading_cogs_from_s3_equals_local_run(
    tmp_path, demo_region, aws_env, dask_cluster, clean_run
):
    """Items with s3:// hrefs read by GDAL through ``read.s3_endpoint`` (moto)."""
    from popdask.stac_server import StacServer

    n = aws_env.upload_tree(demo_region.root, COG_BUCKET, prefix="demo")
    assert n > 100
    items_dir = tmp_path / "items"
    items_dir.mkdir()
    items = [
        rewrite_hrefs(p, f"s3://{COG_BUCKET}/demo", items_dir / p.name, root=demo_region.root)
        for p in demo_region.items.values()
    ]
    with StacServer(list(demo_region.collections.values()), items, cwd=tmp_path) as api:
        cfg_path = write_config(
            tmp_path, url=api.url, census=demo_region.census, address=dask_cluster
        )
        sets = [f"read.s3_endpoint={aws_env.endpoint}"]
        assert cli.main(["run", str(cfg_path), *(x for s in sets for x in ("--set", s))]) == 0
    _assert_same_store(str(tmp_path / "out.zarr"), clean_run.parent / "out.zarr")


# --------------------------------------------------------------------------------------
# Failures: one clear line; unreadable COGs recorded, and a rerun completes
# --------------------------------------------------------------------------------------
def test_unreachable_stac_api_is_one_clear_line_after_retries(nginx, tmp_path):
    # an API answering 503: urllib3 retries (logged by nginx), then one line naming the URL
    down = f"{nginx.url}/stac-down/"
    nginx.fail("/stac-down/", 503)
    try:
        since = nginx.log_offset()
        t0 = time.perf_counter()
        with pytest.raises(SourceError) as err:
            open_catalog(down, retries=2, timeout=2)
        took = time.perf_counter() - t0
        tries = [r for r in nginx.requests(since) if r.path == "/stac-down/"]
    finally:
        nginx.restore()
    assert len(tries) >= 2 and all(r.status == 503 for r in tries) and took < 10, (tries, took)
    msg = str(err.value)
    assert "\n" not in msg and down in msg and "check stac.url" in msg
    # nothing listening at all: connection refused, same kind of message
    from popdask.stac_server import free_port

    gone = f"http://127.0.0.1:{free_port()}/api/v1"
    with pytest.raises(SourceError) as err:
        open_catalog(gone, retries=1, timeout=2)
    assert "\n" not in str(err.value) and gone in str(err.value)


def test_unreachable_stac_api_fails_the_cli_with_one_line(
    tmp_path, demo_region, dask_cluster, capsys
):
    """`popdask run` against a closed port: exit 1 and one line on stderr naming the URL.

    popdask's own retries (5, exponential back-off) make this take about 15 s.
    """
    from popdask.stac_server import free_port

    gone = f"http://127.0.0.1:{free_port()}/api/v1"
    cfg_path = write_config(tmp_path, url=gone, census=demo_region.census, address=dask_cluster)
    capsys.readouterr()
    assert cli.main(["run", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("popdask")]
    assert len(lines) == 1 and lines[0].startswith("popdask: error:") and gone in lines[0], err
    assert "Traceback" not in err and err.strip().endswith(lines[0])
    assert not (tmp_path / "out.zarr").exists()


def test_unreadable_cog_fails_its_tiles_then_a_rerun_completes(
    tmp_path, demo_region, pgstac_api, nginx, client, dask_cluster, clean_run, caplog, capsys
):
    """nginx answers 500 for one COG: GDAL and popdask's reader retry, then give up; the
    tiles that needed it are marked failed and recorded; served again, a rerun finishes.

    The rerun goes to the same workers, so it also checks that the reader makes GDAL
    forget the failure it cached (:func:`popdask.gdal.forget`).
    """
    from popdask.gdal import forget

    used = {i for ids in _recorded(str(clean_run.parent / "out.zarr")).values() for i in ids}
    item = next(it for it in _items(demo_region.items["sentinel-2-l2a"]) if it.id in used)
    local = Path(item.assets["B04"].href)
    bad = "/" + local.relative_to(demo_region.root).as_posix()
    cfg_path = write_config(
        tmp_path, url=pgstac_api, census=demo_region.census, address=dask_cluster
    )
    fast = '--set=read.gdal={GDAL_HTTP_MAX_RETRY: "1", GDAL_HTTP_RETRY_DELAY: "0.1"}'
    out = str(tmp_path / "out.zarr")
    # earlier tests read this file on these workers: drop GDAL's cached copy, so that the
    # failing server is asked (a file recently read is served from the cache, as it should)
    client.run(forget, nginx.url + bad)
    nginx.fail(bad, 500)
    try:
        since = nginx.log_offset()
        with caplog.at_level(logging.ERROR, logger="popdask"):
            assert cli.main(["run", str(cfg_path), fast]) == 1
        assert any(r.path == bad and r.status == 500 for r in nginx.requests(since))
    finally:
        nginx.restore()
    err = capsys.readouterr().err
    assert "failed in the composite pass" in err and "rerun" in err
    failed = store.open_group(out, mode="r").attrs["failed_composite"]
    status = store.tile_status(out)
    tiles = {t.id: t for t in load_config(cfg_path).make_grid().tiles()}
    assert failed and set(failed) <= set(tiles)
    assert {i for i, t in tiles.items() if status[t.row, t.col] == store.FAILED} == set(failed)
    assert all(bad in msg for msg in failed.values()), failed
    logged = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any(bad in m and tid in m for m in logged for tid in failed), logged

    assert cli.main(["run", str(cfg_path), fast]) == 0
    _assert_same_store(out, clean_run.parent / "out.zarr")
    assert store.open_group(out, mode="r").attrs["failed_composite"] == {}  # recovered


def test_an_asset_gone_from_storage_is_filled_counted_and_reported(
    tmp_path, demo_region, pgstac_api, nginx, client, dask_cluster, clean_run, capsys
):
    """nginx answers 404 for one COG the catalog lists: its reads are filled as nodata at
    once (no retry heals a missing file), the run completes, and the loss is counted per
    tile in the store and reported by ``popdask status``, never silent."""
    from popdask.gdal import forget

    used = _recorded(str(clean_run.parent / "out.zarr"))
    item = next(
        it
        for it in _items(demo_region.items["sentinel-2-l2a"])
        if any(it.id in ids for ids in used.values())
    )
    gone = "/" + Path(item.assets["B04"].href).relative_to(demo_region.root).as_posix()
    cfg_path = write_config(
        tmp_path, url=pgstac_api, census=demo_region.census, address=dask_cluster
    )
    out = str(tmp_path / "out.zarr")
    client.run(forget, nginx.url + gone)
    nginx.fail(gone, 404)
    try:
        since = nginx.log_offset()
        assert cli.main(["run", str(cfg_path)]) == 0
        assert any(r.path == gone and r.status == 404 for r in nginx.requests(since))
    finally:
        nginx.restore()
        client.run(forget, nginx.url + gone)
    counts = store.tile_counts(out)
    tiles = load_config(cfg_path).make_grid().tiles()
    hit = {t.id for t in tiles if item.id in used[t.id]}
    assert hit and {t.id for t in tiles if counts["reads_filled"][t.row, t.col] > 0} == hit
    assert (store.tile_status(out) == store.COMPLETE).all()
    capsys.readouterr()
    assert cli.main(["status", out]) == 0
    report = capsys.readouterr().out
    assert "reads filled as nodata" in report and f"in {len(hit)} tiles" in report
