"""Checks of the book's notebooks as files: what nbval and the book build rely on but do not check."""
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_there_are_chapters():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_in_the_table_of_contents(path):
    assert f"chapters/{path.stem}" in (ROOT / "_toc.yml").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_ran_and_stored_no_error(path):
    for cell in code_cells(path):
        assert cell["execution_count"] is not None, cell["source"]
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"], cell["source"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_optlib_from_the_configured_repository(path):
    # The repository URL is set once, in _config.yml; the Colab cell must install from the same place.
    first = "".join(code_cells(path)[0]["source"])
    assert '"google.colab" in sys.modules' in first
    assert f"git+{CONFIG['repository']['url']}" in first
    assert code_cells(path)[0]["outputs"] == []  # outside Colab it prints nothing
    # Noise to a reader of the rendered page: collapsed there behind a "show code" toggle.
    assert "hide-input" in code_cells(path)[0]["metadata"].get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_has_a_caption_and_a_name(path):
    for cell in code_cells(path):
        if any("image/png" in o.get("data", {}) for o in cell["outputs"]):
            figure = cell["metadata"].get("mystnb", {}).get("figure", {})
            assert figure.get("caption") and re.fullmatch(r"fig-[a-z0-9-]+", figure.get("name", "")), cell["source"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_show_no_raw_tensors_or_machine_details(path):
    for cell in code_cells(path):
        for output in cell["outputs"]:
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            assert not re.search(r"(?<![\w.])tensor\(|device='cuda|/tmp/ipykernel_|0x[0-9a-f]{8,}", text), text[:200]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_cell_claims_gpu_results_that_no_gpu_made(path):
    # The stored outputs come from the CPU (nbval hides any GPU): a chapter may not say that a
    # GPU gives the same results.
    for cell in code_cells(path):
        source = "".join(cell["source"])
        assert "the results are the same" not in source, source[:200]
        for output in cell["outputs"]:
            assert "on every device" not in "".join(output.get("text", "")), source[:200]
