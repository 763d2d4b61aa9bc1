"""Tests for popdask.stac_server: a real rustac STAC API on loopback, no mocks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import requests

from popdask.stac_server import StacServer, find_rustac, free_port, wait_for_http

pystac_client = pytest.importorskip("pystac_client")

pytestmark = pytest.mark.integration

COLLECTION = "test-s2"


def _item(item_id: str, lon0: float, lat0: float, date: str) -> dict:
    lon1, lat1 = lon0 + 0.1, lat0 + 0.1
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": item_id,
        "collection": COLLECTION,
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]],
        },
        "bbox": [lon0, lat0, lon1, lat1],
        "properties": {"datetime": f"{date}T10:00:00Z", "eo:cloud_cover": 5.0},
        "links": [],
        "assets": {
            "B04": {
                "href": f"./{item_id}_B04.tif",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            }
        },
    }


@pytest.fixture
def stac_files(tmp_path: Path) -> tuple[Path, Path]:
    """A collection and three items: a and b over one place, c elsewhere; a and c in 2021."""
    collection = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": COLLECTION,
        "description": "tiny test collection",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[10.0, 50.0, 12.1, 50.1]]},
            "temporal": {"interval": [["2021-01-01T00:00:00Z", "2022-12-31T23:59:59Z"]]},
        },
        "links": [],
    }
    items = [
        _item("a", 10.0, 50.0, "2021-07-01"),
        _item("b", 10.0, 50.0, "2022-07-01"),
        _item("c", 12.0, 50.0, "2021-08-01"),
    ]
    coll_path = tmp_path / "collection.json"
    coll_path.write_text(json.dumps(collection))
    items_path = tmp_path / "items.ndjson"
    items_path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return coll_path, items_path


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _ids(search) -> list[str]:
    return sorted(item.id for item in search.items())


def test_find_rustac_and_free_port() -> None:
    assert find_rustac().name.startswith("rustac")
    port = free_port()
    assert 0 < port < 65536
    assert not _accepts(port)


def test_search_bbox_datetime_paging_and_stop(stac_files: tuple[Path, Path]) -> None:
    coll, items = stac_files
    server = StacServer([coll], [items])
    with server:
        assert server.running
        assert server.url.startswith("http://127.0.0.1:")
        assert not server.url.endswith("/")
        port = server.bound_port
        assert port is not None and server.url.endswith(f":{port}")

        client = pystac_client.Client.open(server.url)
        assert [c.id for c in client.get_collections()] == [COLLECTION]

        everything = client.search(collections=[COLLECTION])
        assert _ids(everything) == ["a", "b", "c"]
        west = client.search(collections=[COLLECTION], bbox=[9.9, 49.9, 10.5, 50.5])
        assert _ids(west) == ["a", "b"]
        in_2021 = client.search(collections=[COLLECTION], datetime="2021-01-01/2021-12-31")
        assert _ids(in_2021) == ["a", "c"]
        both = client.search(
            collections=[COLLECTION], bbox=[9.9, 49.9, 10.5, 50.5], datetime="2021"
        )
        assert _ids(both) == ["a"]

        # Paging: one item per page, all three reached through `next` links.
        paged = client.search(collections=[COLLECTION], limit=1)
        pages = list(paged.pages())
        assert [len(page.items) for page in pages] == [1, 1, 1]
        assert sorted(i.id for page in pages for i in page.items) == ["a", "b", "c"]
        next_links = requests.get(f"{server.url}/search?limit=1", timeout=10).json()["links"]
        assert any(
            link["rel"] == "next" and link["href"].startswith(server.url) for link in next_links
        )

        process = server.process
        assert process is not None
    assert not server.running
    assert process.poll() is not None
    assert not _accepts(port)
    server.stop()  # idempotent


def test_explicit_port_and_restart(stac_files: tuple[Path, Path]) -> None:
    coll, items = stac_files
    port = free_port()
    server = StacServer([coll], [items], port=port, cwd=coll.parent)
    try:
        server.start()
        assert server.url == f"http://127.0.0.1:{port}"
        assert wait_for_http(server.url + "/collections", 5).status_code == 200
        assert server.start() is server  # already running: no second process
    finally:
        server.stop()
    assert not _accepts(port)


def test_bad_input_raises_and_leaves_nothing(stac_files: tuple[Path, Path], tmp_path: Path) -> None:
    coll, _ = stac_files
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"type": "Feature", "id": "x"}\n{not json\n')
    server = StacServer([coll], [bad], startup_timeout=15)
    with pytest.raises(RuntimeError, match=r"exited with code") as info:
        server.start()
    assert "ERROR" in str(info.value)  # rustac's own message is included
    assert server.process is None
    assert not server.running
    assert server.url == ""


def test_missing_file_and_busy_port(stac_files: tuple[Path, Path], tmp_path: Path) -> None:
    coll, items = stac_files
    with pytest.raises(FileNotFoundError, match=r"nope\.ndjson"):
        StacServer([coll], [tmp_path / "nope.ndjson"]).start()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = StacServer([coll], [items], port=port)
        with pytest.raises(RuntimeError, match="in use"):
            server.start()
        assert not server.running


def test_log_file_kept(stac_files: tuple[Path, Path], tmp_path: Path) -> None:
    coll, items = stac_files
    log = tmp_path / "logs" / "rustac.log"
    with StacServer([coll], [items], log_path=log) as server:
        assert "Serving a STAC API" in server.log_tail()
    assert log.exists()
