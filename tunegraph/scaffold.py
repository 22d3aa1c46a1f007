"""`tunegraph init DIR`: a new workspace — git, DVC, a starter recipe with its data, and its dvc.yaml.

The workspace keeps the repository's layout (``recipes/<name>.yaml``, the data files the recipe's
params name at the same relative paths), so the copied recipe runs unchanged. Stage outputs
(``data/out/...``) are not git-ignored here as a block: DVC writes its own ``.gitignore`` entries
for each artifact directory when it records them, and the small metrics files beside them
(``data/out/<recipe>/metrics/``) are meant to be committed to git.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tunegraph.errors import TunegraphError

# The recipes and data shipped with tunegraph: the repository root of this (editable) install.
SHIPPED_ROOT = Path(__file__).resolve().parents[1]

GITIGNORE = """\
# tunegraph's workspace state: the MLflow store, Prefect's home, run reports
.tunegraph/
# sweep points are not DVC stages: their artifacts stay local (see docs/report-and-sweeps.md)
data/out/*/sweep/
__pycache__/
.venv/
"""


@dataclass(frozen=True)
class Workspace:
    """What ``init`` created: the directory and the recipe inside it, relative to it."""

    root: Path
    recipe: Path


def shipped_recipes() -> dict[str, Path]:
    """Starter recipes by name (the stem of ``recipes/<name>.yaml``)."""
    folder = SHIPPED_ROOT / "recipes"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _check_empty(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise TunegraphError(f"{root} exists and is not a directory; choose a new directory for the workspace")
    if root.is_dir():
        entries = sorted(p.name for p in root.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise TunegraphError(f"{root} is not empty (it holds {shown}); `tunegraph init` only fills a new or "
                                 f"empty directory — choose another one")


def _starter_recipe(name: str) -> Path:
    recipes = shipped_recipes()
    if name not in recipes:
        from tunegraph.suggest import did_you_mean

        known = ", ".join(recipes) or f"none (no recipes/ folder under {SHIPPED_ROOT})"
        raise TunegraphError(f"--recipe: no starter recipe named {name!r}{did_you_mean(name, recipes)}; "
                             f"starter recipes: {known}")
    return recipes[name]


def _data_files(recipe_path: Path) -> list[str]:
    """The workspace files the recipe's params name (relative paths), which the workspace needs."""
    from tunegraph.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    files = []
    for stage in recipe.stages.values():
        files += [rel for rel in stage.params.input_files() if not Path(rel).is_absolute()]
    return sorted(dict.fromkeys(files))


def _sh(args: list[str], cwd: Path) -> None:
    try:
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise TunegraphError(f"`{args[0]}` is not installed or not on PATH; `tunegraph init` needs it") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise TunegraphError(f"`{' '.join(args)}` failed in {cwd}: {detail[-1] if detail else 'no output'}")


def _dvc() -> list[str]:
    """DVC from this interpreter's environment (-P: never import the working directory's folders)."""
    return [sys.executable, "-P", "-m", "dvc"]


def init_workspace(root: Path, recipe_name: str = "quickstart") -> Workspace:
    """Create ``root`` as a tunegraph workspace; refuse a non-empty directory before touching anything."""
    from tunegraph.dvcgen import write_dvc_yaml
    from tunegraph.recipe import load_recipe

    root = root.resolve()
    _check_empty(root)
    source = _starter_recipe(recipe_name)
    data_files = _data_files(source)  # validates the starter recipe before anything is created
    for rel in data_files:
        if not (SHIPPED_ROOT / rel).is_file():
            raise TunegraphError(f"{source}: names {rel}, which is not shipped under {SHIPPED_ROOT}")

    root.mkdir(parents=True, exist_ok=True)
    recipe_rel = Path("recipes") / source.name
    (root / recipe_rel).parent.mkdir(parents=True)
    shutil.copyfile(source, root / recipe_rel)
    for rel in data_files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHIPPED_ROOT / rel, root / rel)
    (root / ".gitignore").write_text(GITIGNORE, encoding="utf-8")

    _sh(["git", "init", "-q"], root)
    _sh([*_dvc(), "init", "-q"], root)
    _sh([*_dvc(), "config", "core.analytics", "false"], root)
    write_dvc_yaml([load_recipe(root / recipe_rel)], root, root / "dvc.yaml")
    return Workspace(root, recipe_rel)


def next_steps(workspace: Workspace, shown_root: str) -> str:
    """The commands to run next, as ``init`` prints them (see docs/operations-dvc.md)."""
    recipe = workspace.recipe.as_posix()
    steps = [(f"cd {shown_root}", ""),
             (f"tunegraph run {recipe}", "run the flow; artifacts land in data/out/"),
             ("dvc commit -f", "record the artifacts in dvc.lock and DVC's cache"),
             ('git add -A && git commit -m "first run"', "recipe, dvc.yaml, dvc.lock, metrics"),
             ("dvc remote add -d storage /path/to/dvc-remote", "or s3://bucket/path, ssh://host/path, ..."),
             ('git commit -am "DVC remote" && dvc push', "the artifacts go to the remote")]
    width = max(len(command) for command, _ in steps) + 2
    lines = [f"  {command:<{width}}{'# ' + note if note else ''}".rstrip() for command, note in steps]
    return "\n".join([
        f"created a tunegraph workspace in {shown_root}: git + DVC, {recipe} and its data, dvc.yaml", "",
        "next:", *lines, "",
        f"elsewhere:            git clone ... && dvc pull && tunegraph run {recipe}   (every stage: cached)",
        f"after recipe edits:   tunegraph dvc {recipe}   (regenerates dvc.yaml)"])
