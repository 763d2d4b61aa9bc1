"""notebooks/explore.ipynb runs against finished stores without a cell error and draws."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from popdask import cli

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


@pytest.fixture(scope="module")
def second_rebuild(clean_run, tmp_path_factory):
    """Another rebuild of the same region (fewer clusters), to compare with."""
    out = tmp_path_factory.mktemp("rebuild_b") / "b.zarr"
    args = [
        "run",
        str(clean_run),
        "--set",
        "model.clusters=15",
        "--set",
        f"output.path={out}",
        "--report-dir",
        str(out.parent),
    ]
    assert cli.main(args) == 0
    return out


def test_explore_notebook_executes(clean_run, second_rebuild, monkeypatch, tmp_path):
    monkeypatch.setenv("POPDASK_STORE", str(clean_run.parent / "out.zarr"))
    monkeypatch.setenv("POPDASK_STORE_B", str(second_rebuild))
    monkeypatch.setenv("POPDASK_CLUSTER", json.dumps({"kind": "local", "workers": 1}))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # maps, per-cluster densities, residuals, rebuild comparison
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "EPSG:3035" in text and "total A" in text
