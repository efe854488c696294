"""Executes every example notebook on the default model (slow: converts it once per cache).

The kernel is this interpreter (`sys.executable`), whatever kernelspecs the user has installed:
a private kernelspec directory holding a `python3` spec that runs `sys.executable -m
ipykernel_launcher` is the only one the kernel manager searches.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))

pytestmark = pytest.mark.slow


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"


def test_notebooks_match_their_generator(tmp_path):
    """The committed notebooks are what build_notebooks.py writes."""
    sys.path.insert(0, NOTEBOOK_DIR)
    try:
        import build_notebooks
    finally:
        sys.path.remove(NOTEBOOK_DIR)
    for path in build_notebooks.build(str(tmp_path)):
        with open(path, encoding="utf-8") as f, \
                open(os.path.join(NOTEBOOK_DIR, os.path.basename(path)), encoding="utf-8") as g:
            assert f.read() == g.read(), f"{os.path.basename(path)} is stale: run notebooks/build_notebooks.py"


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A KernelSpecManager that only knows a `python3` kernel running this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / "python3"
    spec_dir.mkdir()
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (jaxgen tests)",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    assert ksm.get_kernel_spec("python3").argv[0] == sys.executable
    return ksm


def execute(name: str, kernel_spec_manager, timeout: int = 600):
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_spec_manager)
    assert km.kernel_spec.argv[0] == sys.executable
    client = NotebookClient(nb, km=km, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    try:
        client.execute()  # raises CellExecutionError, naming the cell, when one fails
    finally:
        # A client given its kernel manager leaves the kernel running: each notebook's kernel
        # (1.5-8 GB with a model loaded) would outlive its test.
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def outputs(nb, output_type=None):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if output_type is None or out.output_type == output_type:
                yield out


def stdout_of(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb, "stream") if o.get("name") == "stdout")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_spec_manager, default_model_dir, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # 04 sets its own; the kernel inherits our env
    nb = execute(name, kernel_spec_manager)
    assert not list(outputs(nb, "error"))
    text = stdout_of(nb)
    assert default_model_dir in text or name.startswith("04")
    if name.startswith("01"):
        assert "The three most important inventions in history are" in text
        assert "perplexity" in text
    elif name.startswith("02"):
        images = [o for o in outputs(nb, "display_data") if "image/png" in o.get("data", {})]
        assert len(images) == 1
        assert "natural" in text and "random" in text
    elif name.startswith("03"):
        assert "cached static prompt:" in text and "after clear_static_prompt_cache()" in text
    elif name.startswith("04"):
        assert "devices: cpu [0, 1, 2, 3]" in text
        assert "8 prompts in" in text
    elif name.startswith("05"):
        images = [o for o in outputs(nb, "display_data") if "image/png" in o.get("data", {})]
        assert len(images) == 1  # the attribution heat map
        assert text.count("attribution ") == 5
        assert "no digits:" in text and "speed-up" in text
