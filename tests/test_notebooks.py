"""Every notebook in notebooks/ runs top to bottom, and is committed without outputs.

Each notebook runs in a fresh kernel of this interpreter (not whatever "python3" kernel a
machine has registered), from the notebooks folder, with LUCID_FN_NOTEBOOK_FAST=1 so that
notebooks may pick smaller settings. A failing cell fails the test with the cell's source
and traceback. New notebooks are picked up by the glob.
"""

import json
import os
import pathlib
import sys

import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # generous: a slow laptop compiling a train step
KERNEL = "lucid-fn-test-python"


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "fine_tune.ipynb", "attention_maps.ipynb"} <= names, names


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that runs ipykernel in this very interpreter, so the notebooks see the
    environment the tests run in."""
    pytest.importorskip("ipykernel", reason="notebook tests need the test extras: "
                                            "pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lucid_fn tests", "language": "python"}))
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(kernel_dir), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("LUCID_FN_NOTEBOOK_FAST", "1")
    # Figures rendered into the outputs, as in Jupyter, so drawing errors fail the test too.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    """Outputs bloat diffs and go stale: strip them before committing (README of notebooks/)."""
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs; strip them with "
                       f"jupyter nbconvert --clear-output --inplace {path}")
