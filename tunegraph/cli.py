"""The ``tunegraph`` command: run a recipe, run one stage, validate, generate dvc.yaml.

User errors (:class:`TunegraphError`) print one line, ``error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tunegraph.errors import TunegraphError


def _prefect_environment(workspace: Path) -> None:
    """Defaults for Prefect's ephemeral API, set before prefect is imported; the user's settings win."""
    os.environ.setdefault("PREFECT_HOME", str(workspace / ".tunegraph" / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's console handler would repeat each failure as a traceback; tunegraph prints its own
    # progress and one-line errors. The API handler keeps full logs for the Prefect UI.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def cmd_run(args: argparse.Namespace) -> int:
    from tunegraph.recipe import load_recipe
    from tunegraph.summary import print_summary
    from tunegraph.tracking import tracking_uri

    workspace = Path(args.workspace).resolve()
    recipe = load_recipe(args.recipe)  # validate before starting Prefect
    _prefect_environment(workspace)
    from tunegraph.flows.recipe_flow import run_recipe

    started = time.monotonic()
    uri = tracking_uri(workspace, recipe.spec.tracking.mlflow_uri)
    try:
        results = run_recipe(str(recipe.path), str(workspace), args.only, args.from_stage, args.force,
                             args.parallel)
    except Exception as exc:
        partial = getattr(exc, "stage_results", None)
        if partial:
            print_summary(recipe, partial, workspace, uri, time.monotonic() - started)
        if isinstance(exc, TunegraphError):
            raise
        print(f"error: {exc} (its output is above; the finished stages are kept: re-run to resume)", file=sys.stderr)
        return 1
    print_summary(recipe, results, workspace, uri, time.monotonic() - started)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tunegraph.lineage import is_cached, plan_stage
    from tunegraph.recipe import load_recipe
    from tunegraph.runner import execute_stage
    from tunegraph.tracking import Tracker

    workspace = Path(args.workspace).resolve()
    recipe = load_recipe(args.recipe)
    if args.name not in recipe.stages:
        from tunegraph.errors import RecipeError
        from tunegraph.suggest import did_you_mean

        raise RecipeError(f"{args.recipe}: no stage named {args.name!r}{did_you_mean(args.name, recipe.stages)}")
    plan = plan_stage(recipe, workspace, args.name)
    if not args.force and is_cached(plan):
        print(f"[{args.name}] cached ({plan.fingerprint[:12]})", file=sys.stderr)
        return 0
    tracker = Tracker.for_recipe(recipe, workspace)
    run_id = tracker.start_stage_run(plan, args.parent_run_id, runner=args.runner)
    try:
        outcome = execute_stage(recipe, workspace, args.name, force=True, plan=plan,
                                step_logger=tracker.step_logger(run_id))
    except BaseException as exc:
        tracker.finish_stage_run(run_id, status="FAILED", error=str(exc))
        raise
    tracker.finish_stage_run(run_id, outcome)
    print(f"[{args.name}] ran in {outcome.duration_s:.1f} s  -> {outcome.path}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tunegraph.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: ok — {len(recipe.stages)} stages")
    for name in recipe.order:
        stage = recipe.stages[name]
        inputs = ", ".join(f"{slot}<-{up}" for slot, up in stage.spec.inputs.items())
        print(f"  {name:<20} {stage.kind.name:<16} {inputs}")
    return 0


def cmd_dvc(args: argparse.Namespace) -> int:
    from tunegraph.dvcgen import check_dvc_yaml, write_dvc_yaml
    from tunegraph.recipe import load_recipe

    workspace = Path(args.workspace).resolve()
    recipes = [load_recipe(path) for path in args.recipes]
    output = workspace / args.output
    if args.check:
        stale = check_dvc_yaml(recipes, workspace, output)
        if stale:
            print(f"error: {args.output} is out of sync with {', '.join(args.recipes)}: {stale}; "
                  f"run `tunegraph dvc {' '.join(args.recipes)}`", file=sys.stderr)
            return 1
        print(f"{args.output} is in sync")
        return 0
    write_dvc_yaml(recipes, workspace, output)
    print(f"wrote {args.output} ({sum(len(r.stages) for r in recipes)} stages); run `dvc repro`")
    return 0


def cmd_kinds(args: argparse.Namespace) -> int:
    from tunegraph.registry import all_kinds

    for name, kind in sorted(all_kinds().items()):
        slots = ", ".join(f"{s.name}:{'|'.join(s.accepts)}{'?' if s.optional else ''}" for s in kind.inputs)
        doc = (kind.fn.__doc__ or "").strip().splitlines()[0] if kind.fn.__doc__ else ""
        print(f"{name:<16} -> {kind.produces:<8} inputs[{slots}]  {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunegraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_workspace(p):
        p.add_argument("-C", "--workspace", default=".",
                       help="directory that relative paths, outputs and the MLflow store live in (default: .)")

    run = sub.add_parser("run", help="run a recipe as a Prefect flow (cached stages are reused)")
    run.add_argument("recipe", help="path to the recipe YAML")
    run.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and its descendants")
    run.add_argument("--force", action="store_true", help="ignore cached artifacts of the selected stages")
    run.add_argument("--parallel", type=int, default=1,
                     help="how many independent stages may run at once (default 1: each stage uses all threads)")
    add_workspace(run)
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage in this process (what the flow and dvc.yaml call)")
    stage.add_argument("recipe")
    stage.add_argument("name", help="stage name in the recipe")
    stage.add_argument("--force", action="store_true", help="run even if the artifact is cached")
    stage.add_argument("--parent-run-id", help="MLflow run to nest this stage's run under")
    stage.add_argument("--runner", default="cli", help=argparse.SUPPRESS)
    add_workspace(stage)
    stage.set_defaults(func=cmd_stage)

    validate = sub.add_parser("validate", help="check a recipe and print its DAG")
    validate.add_argument("recipe")
    validate.set_defaults(func=cmd_validate)

    dvc = sub.add_parser("dvc", help="write dvc.yaml from recipes (one DVC stage per recipe stage)")
    dvc.add_argument("recipes", nargs="+", help="recipe files; their stages all go into one dvc.yaml")
    dvc.add_argument("-o", "--output", default="dvc.yaml", help="where to write, relative to the workspace")
    dvc.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    add_workspace(dvc)
    dvc.set_defaults(func=cmd_dvc)

    kinds = sub.add_parser("kinds", help="list the registered stage kinds")
    kinds.set_defaults(func=cmd_kinds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TunegraphError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
