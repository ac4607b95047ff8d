"""launch/colab_tpu_demo.ipynb executes top to bottom on CPU with the small setting."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "launch" / "colab_tpu_demo.ipynb"


def test_the_colab_notebook_runs_on_cpu_and_shows_its_table_plot_and_token_page(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DASD_DEMO_SMALL", "1")
    monkeypatch.setenv("DASD_DEMO_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs)
    assert "backend: cpu" in text and "rule" in text and "dasd" in text
    kinds = {kind for output in outputs for kind in output.get("data", {})}
    assert {"image/png", "text/html"} <= kinds
    assert (tmp_path / "analysis" / "tokens.html").exists()
