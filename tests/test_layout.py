"""The install layout: one tunegraph.* namespace, every subpackage packaged, no generic top-level names."""

import importlib.util
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"tunegraph": "tunegraph", "flows": "tunegraph.flows", "tasks": "tunegraph.tasks",
           "kernels": "tunegraph.kernels"}


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, dotted in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((dotted, *rel)))
    assert found == listed


def test_no_top_level_kernels_tasks_or_flows_module_leaks():
    # transformers probes `import kernels` (Hugging Face's package); ours must not answer.
    for name in ("kernels", "tasks", "flows"):
        assert importlib.util.find_spec(name) is None, name
    assert importlib.util.find_spec("tunegraph.kernels").origin == str(REPO / "kernels" / "__init__.py")
