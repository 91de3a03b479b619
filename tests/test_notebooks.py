"""The notebooks in ``notebooks/`` run end to end, and are committed without outputs.

Each notebook is executed with nbclient on the ``python3`` kernel of the
interpreter running the tests (the project's venv: jupyter_client starts a
kernel spec whose command is ``python`` with ``sys.executable``), with the
notebooks' folder as working directory and this process's environment —
``PYCRCNN_SHARED`` included — passed to the kernel explicitly. A last,
unsaved cell checks from inside the kernel that both held.

Set ``PYCRCNN_NOTEBOOK_OUTPUT_DIR`` to keep the executed notebooks there.
The notebooks run real encrypted models (PyCrCNN.ipynb also starts a server
process), about a minute each on two idle cores: they are marked ``slow``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import nbformat
import nbclient
import ipykernel  # noqa: F401  (a test dependency: the notebooks run on it)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ["PyCrCNN.ipynb", "HE-ML.ipynb"]
CELL_TIMEOUT = 600  # seconds per cell

#: appended to the executed copy (never saved): what the kernel really runs on
_PROBE = """
import json, os, sys
print("PYCRCNN_PROBE" + json.dumps({"prefix": sys.prefix, "executable": sys.executable,
                                    "shared": os.environ.get("PYCRCNN_SHARED"), "cwd": os.getcwd()}))
"""


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _kernel_env() -> dict:
    env = dict(os.environ)
    # The package as the tests import it (an editable install points here too).
    python_dir = str(REPO / "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_saved_without_outputs(name):
    path = NOTEBOOK_DIR / name
    assert path.is_file(), f"{path} is missing"
    nb = _read(name)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{name}: code cells {dirty} have outputs or execution counts; clear them before committing"
    with_attachments = [i for i, cell in enumerate(nb.cells) if cell.get("attachments")]
    assert not with_attachments, f"{name}: cells {with_attachments} carry attachments"


def _error_outputs(nb):
    errors = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append((i, out.get("ename"), out.get("evalue")))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    nb = _read(name)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    except nbclient.exceptions.CellExecutionError as exc:
        # keep the executed notebook for inspection
        nbformat.write(nb, tmp_path / name)
        pytest.fail(f"{name}: a cell failed (executed copy: {tmp_path / name}):\n{exc}", pytrace=False)
    seconds = time.perf_counter() - t0
    print(f"\n{name}: executed in {seconds:.1f} s")
    keep = os.environ.get("PYCRCNN_NOTEBOOK_OUTPUT_DIR")
    if keep:  # to look at the executed notebooks
        Path(keep).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(keep) / name)

    assert not _error_outputs(nb), _error_outputs(nb)
    probe = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    assert "PYCRCNN_PROBE" in probe, probe
    seen = json.loads(probe.split("PYCRCNN_PROBE", 1)[1].strip().splitlines()[0])
    assert Path(seen["prefix"]).resolve() == Path(sys.prefix).resolve(), \
        f"the kernel ran on {seen['executable']}, not on this interpreter's environment ({sys.prefix})"
    assert seen["shared"] == os.environ.get("PYCRCNN_SHARED"), seen
    assert Path(seen["cwd"]).resolve() == NOTEBOOK_DIR.resolve(), seen

    if name == "HE-ML.ipynb":
        pngs = [o for cell in nb.cells for o in cell.get("outputs", [])
                if "image/png" in o.get("data", {})]
        assert pngs, "HE-ML.ipynb shows no inline PNG figure"
