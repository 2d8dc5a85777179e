"""The notebooks in analysis/notebooks/ run top to bottom in a fresh kernel (nbclient) against traces/.

02-replay-and-compare also records and replays fresh runs when /dev/kvm is usable, so it is a KVM test too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis" / "notebooks"
NAMES = ["01-first-trace.ipynb", "02-replay-and-compare.ipynb"]


def test_the_notebooks_are_there_and_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, name
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif "data" in out:
                text.append(out.data.get("text/plain", ""))
    return "\n".join(text)


def _execute(name: str, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError with the failing cell and traceback
    nbformat.write(nb, tmp_path / name)  # kept for a look when something is off
    return nb


@pytest.mark.slow
def test_first_trace_notebook_executes(tmp_path):
    nb = _execute("01-first-trace.ipynb", tmp_path)
    text = _outputs(nb)
    assert "<analysis.Trace files.tvt: 47 exits, 47 hypercalls" in text
    assert "first open wrote 81 bytes and read 86 ; second read 81" in text
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 4  # the four plots rendered inline


@pytest.mark.slow
@pytest.mark.kvm
def test_replay_and_compare_notebook_executes(tmp_path):
    nb = _execute("02-replay-and-compare.ipynb", tmp_path)
    text = _outputs(nb)
    assert "no difference" in text
    assert "first difference at vCPU 0 event #4: compute.tvt seq 5 (hostio)" in text
    assert "exit status 0 events matched:" in text  # the fresh replay under KVM ran and verified
    assert "compute: N=300 checksum=" in text  # and its console reached the notebook
    assert "first difference at vCPU 0 event #4: c300.tvt seq 5 (hostio)" in text
