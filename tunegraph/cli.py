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
    from prefect.settings import PREFECT_API_URL

    from tunegraph.flows.recipe_flow import run_recipe
    from tunegraph.flows.task_runners import check_remote_dask_api, describe_task_runner

    check_remote_dask_api(args.dask, PREFECT_API_URL.value())
    if args.dask:
        print(describe_task_runner(args.parallel, args.dask), file=sys.stderr)
    started = time.monotonic()
    uri = tracking_uri(workspace, recipe.spec.tracking.mlflow_uri)
    if recipe.spec.sweep is not None:
        return _run_sweep(args, recipe, workspace)
    try:
        results = run_recipe(str(recipe.path), str(workspace), args.only, args.from_stage, args.force,
                             args.parallel, args.dask, args.accelerator_slots)
    except Exception as exc:
        partial = getattr(exc, "stage_results", None)
        if partial:
            print_summary(recipe, partial, workspace, uri, time.monotonic() - started)
            _write_run_report(recipe, workspace, None, args.no_report)
        if isinstance(exc, TunegraphError):
            raise
        print(f"error: {exc} (its output is above; the finished stages are kept: re-run to resume)", file=sys.stderr)
        return 1
    print_summary(recipe, results, workspace, uri, time.monotonic() - started)
    _write_run_report(recipe, workspace, None, args.no_report)
    return 0


def _run_sweep(args: argparse.Namespace, recipe, workspace: Path) -> int:
    """A recipe with a ``sweep:`` block: one child flow run per grid point, then the ranking."""
    from tunegraph.flows.sweep_flow import run_sweep
    from tunegraph.sweep import print_ranking

    outcomes = run_sweep(str(recipe.path), str(workspace), args.only, args.from_stage, args.force, args.parallel,
                         args.dask, args.accelerator_slots)
    print_ranking(recipe, outcomes)
    for outcome in outcomes:
        if outcome.mlflow_run_id:
            _write_run_report(recipe, workspace, outcome.mlflow_run_id, args.no_report)
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} sweep points failed; first, {failed[0].point.id}: "
              f"{failed[0].error} (finished stages are kept: re-run to resume)", file=sys.stderr)
        return 1
    return 0


def _write_run_report(recipe, workspace: Path, run_ref: str | None, skip: bool) -> None:
    """The HTML report of a flow run just finished (default: the newest); writing it never fails the run."""
    if skip:
        return
    from tunegraph.report import write_report

    try:
        path = write_report(recipe, workspace, run_ref)
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded; the report is a convenience
        print(f"warning: no run report: {exc}", file=sys.stderr)
        return
    print(f"report:     {path.relative_to(workspace) if path.is_relative_to(workspace) else path}")


def cmd_report(args: argparse.Namespace) -> int:
    from tunegraph.recipe import load_recipe
    from tunegraph.report import write_report

    workspace = Path(args.workspace).resolve()
    recipe = load_recipe(args.recipe)
    path = write_report(recipe, workspace, args.run, Path(args.output).resolve() if args.output else None)
    print(f"wrote {path}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from tunegraph.recipe import load_recipe

    workspace = Path(args.workspace).resolve()
    recipes = [load_recipe(path) for path in args.recipes]  # validate before talking to Prefect
    if args.name and len(recipes) > 1:
        raise TunegraphError("--name names one deployment; with several recipes each is named after its recipe")
    if args.no_serve and args.dask:
        raise TunegraphError("--dask needs a served deployment (the worker runs stages in a thread pool); drop --no-serve")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from tunegraph.flows.accelerator import ensure_accelerator_limit
    from tunegraph.flows.deploy import (Schedule, build_deployment, parse_param_overrides, prepare_tracking,
                                        register_for_worker, require_prefect_api, serve_deployments)
    from tunegraph.flows.task_runners import describe_task_runner

    overrides = parse_param_overrides(args.param or [])
    schedule = Schedule(args.cron, args.interval)
    schedule.as_kwargs()  # checks it before anything is registered
    url = require_prefect_api()
    slots = ensure_accelerator_limit(args.accelerator_slots)
    deployments = [build_deployment(recipe, workspace, name=args.name, schedule=schedule, overrides=overrides,
                                    parallel=args.parallel, dask=args.dask) for recipe in recipes]
    if len({d.name for d in deployments}) < len(deployments):
        raise TunegraphError("two recipes share a name; deploy them one at a time with --name")
    prepare_tracking(recipes, workspace)
    if args.no_serve:
        names = register_for_worker(deployments, args.pool, args.parallel)
        print(f"registered {', '.join(names)} on work pool {args.pool!r} at {url} "
              f"(accelerator stages: {slots} at a time)")
        print(f"start a worker:  prefect worker start --pool {args.pool}")
        print(f"trigger a run:   prefect deployment run '{names[0]}'")
        return 0
    print(f"serving at {url}: {describe_task_runner(args.parallel, args.dask)}, accelerator stages {slots} at a time; "
          f"Ctrl-C stops", file=sys.stderr)
    serve_deployments(deployments)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tunegraph.distributed import init_process_group
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
    world = init_process_group()  # joins torchrun's process group when launched by it
    if not world.is_main:  # rank 0 tracks and commits; this rank only trains its data shard
        execute_stage(recipe, workspace, args.name, force=True, plan=plan)
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
    _report_registered(args.name, tracker.register_model(run_id, recipe, plan, outcome))
    return 0


def _report_registered(stage: str, registered) -> None:
    if registered is not None:
        what = "registered as" if registered.created else "already registered as"
        print(f"[{stage}] {what} model {registered.name!r} version {registered.version}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from tunegraph.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: ok — {len(recipe.stages)} stages")
    for name in recipe.order:
        stage = recipe.stages[name]
        inputs = ", ".join(f"{slot}<-{up if isinstance(up, str) else '[' + ', '.join(up) + ']'}"
                           for slot, up in stage.spec.inputs.items())
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
        slots = ", ".join(f"{s.name}:{'|'.join(s.accepts)}{'[]' if s.many else ''}{'?' if s.optional else ''}"
                          for s in kind.inputs)
        doc = (kind.fn.__doc__ or "").strip().splitlines()[0] if kind.fn.__doc__ else ""
        print(f"{name:<16} -> {kind.produces:<8} inputs[{slots}]  {doc}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from tunegraph.compare import load_flow_runs, print_comparison
    from tunegraph.recipe import load_recipe
    from tunegraph.tracking import tracking_uri

    workspace = Path(args.workspace).resolve()
    recipe = load_recipe(args.recipe)
    client = MlflowClient(tracking_uri=tracking_uri(workspace, recipe.spec.tracking.mlflow_uri))
    runs = load_flow_runs(client, recipe.spec.tracking.experiment or recipe.name, args.runs or [], args.last)
    print_comparison(runs, show_timings=args.timings)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tunegraph.serve import serve

    serve(args.model, workspace=Path(args.workspace).resolve(), host=args.host, port=args.port, name=args.name,
          threads=args.threads, dtype=args.dtype)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from tunegraph.scaffold import init_workspace, next_steps

    workspace = init_workspace(Path(args.directory), args.recipe)
    print(next_steps(workspace, args.directory))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunegraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_workspace(p):
        p.add_argument("-C", "--workspace", default=".",
                       help="directory that relative paths, outputs and the MLflow store live in (default: .)")

    def add_scale_out(p):
        p.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",  # "local": task_runners.LOCAL_DASK
                       help="run stages on Dask: a local cluster of --parallel workers, or the scheduler at "
                            "ADDRESS (tcp://host:8786; needs a Prefect server and a shared workspace path)")
        p.add_argument("--accelerator-slots", type=int, metavar="N",
                       help="training/generation stages that may run at once, across all flows on the Prefect "
                            "API (default: the limit already set there, else 1)")

    run = sub.add_parser("run", help="run a recipe as a Prefect flow (cached stages are reused)")
    run.add_argument("recipe", help="path to the recipe YAML")
    run.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and its descendants")
    run.add_argument("--force", action="store_true", help="ignore cached artifacts of the selected stages")
    run.add_argument("--parallel", type=int, default=1,
                     help="how many independent stages may run at once (default 1: each stage uses all threads)")
    run.add_argument("--no-report", action="store_true",
                     help="do not write the HTML run report (.tunegraph/reports/<run>.html)")
    add_scale_out(run)
    add_workspace(run)
    run.set_defaults(func=cmd_run)

    deploy = sub.add_parser("deploy", help="register recipes as Prefect deployments on a server and serve them")
    deploy.add_argument("recipes", nargs="+", metavar="recipe", help="recipe YAML files (one deployment each)")
    when = deploy.add_mutually_exclusive_group()
    when.add_argument("--cron", help='run on this schedule, e.g. "0 3 * * *" (default: only when triggered)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    deploy.add_argument("--name", help="deployment name (default: the recipe's name)")
    deploy.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="default flow parameter, YAML value, e.g. force=true or only=[sft] (repeatable; "
                             "each run may override it)")
    deploy.add_argument("--parallel", type=int, default=1, help="how many independent stages may run at once")
    add_scale_out(deploy)
    deploy.add_argument("--no-serve", action="store_true",
                        help="only register, on a process work pool, for `prefect worker start`")
    deploy.add_argument("--pool", default="tunegraph", help="work pool for --no-serve (default: tunegraph)")
    add_workspace(deploy)
    deploy.set_defaults(func=cmd_deploy)

    stage = sub.add_parser("stage", help="run one stage in this process (what the flow and dvc.yaml call)")
    stage.add_argument("recipe")
    stage.add_argument("name", help="stage name in the recipe")
    stage.add_argument("--force", action="store_true", help="run even if the artifact is cached")
    stage.add_argument("--parent-run-id", help="MLflow run to nest this stage's run under")
    stage.add_argument("--runner", default="cli", help=argparse.SUPPRESS)
    add_workspace(stage)
    stage.set_defaults(func=cmd_stage)

    compare = sub.add_parser("compare", help="flow runs side by side from MLflow: metrics per stage, params that differ")
    compare.add_argument("recipe", help="the recipe whose experiment holds the runs")
    compare.add_argument("runs", nargs="*", help="flow run ids (a unique prefix) or run names; default: the newest")
    compare.add_argument("--last", type=int, default=2, help="how many of the newest flow runs to compare (default 2)")
    compare.add_argument("--timings", action="store_true", help="also show durations and tokens/s")
    add_workspace(compare)
    compare.set_defaults(func=cmd_compare)

    init = sub.add_parser("init", help="create a workspace: git, DVC, a starter recipe with its data, dvc.yaml")
    init.add_argument("directory", help="a new or empty directory")
    init.add_argument("--recipe", default="quickstart",
                      help="starter recipe, one of recipes/*.yaml by name (default: quickstart)")
    init.set_defaults(func=cmd_init)

    report = sub.add_parser("report", help="write a flow run's HTML report: timeline, curves, data funnel, evals")
    report.add_argument("recipe", help="the recipe whose experiment holds the run")
    report.add_argument("run", nargs="?", help="flow run id (a unique prefix) or run name; default: the newest")
    report.add_argument("-o", "--output", help="HTML file to write (default: .tunegraph/reports/<run name>.html)")
    add_workspace(report)
    report.set_defaults(func=cmd_report)

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

    serve = sub.add_parser("serve", help="serve a local model as an OpenAI-compatible chat-completions endpoint")
    serve.add_argument("model", help="embedded:NAME, tiny:NAME, a model directory (e.g. a stage's output) "
                                     "or a cached hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--name", help="model name clients send (default: MODEL as given)")
    serve.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights dtype")
    add_workspace(serve)
    serve.set_defaults(func=cmd_serve)
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
