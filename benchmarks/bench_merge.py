"""tunegraph's ``merge`` stage vs the ``mergekit-yaml`` CLI on the same TIES config: wall time.

Two checkpoints the size of the embedded SmolLM2-135M-Instruct (each the converted base plus seeded
noise) are TIES-merged onto that base (weights 0.5/0.5, density 0.5), three ways:

- ``mergekit-yaml CONFIG OUT --random-seed 0``: the CLI, a fresh process, as a user runs it;
- the ``merge`` stage function in a fresh process (``python -P -c``): imports, compatibility checks,
  config building, mergekit's Python API, ``mergekit_config.yml``; the same work as the CLI plus ours;
- in this process, the stage function vs ``mergekit.merge.run_merge`` alone (imports already paid):
  what the checks and config building cost on their own.

The YAML given to the CLI is the one the stage builds (``tunegraph.mergekit_config``), with paths.
Runs alternate (CLI, stage, CLI, stage, ...) and each row keeps its fastest run, so load from other
processes on the machine hits both sides alike. The issue's goal: stage <= 1.1x the CLI.

    .venv/bin/python -P benchmarks/bench_merge.py                 # 2 repeats
    .venv/bin/python -P benchmarks/bench_merge.py --repeats 3 --work /tmp/bench-merge
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure, ratio  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
PARAMS = {"method": "ties", "models": {"expert_a": {"weight": 0.5}, "expert_b": {"weight": 0.5}},
          "parameters": {"density": 0.5}}
SEED = 0

STAGE_CHILD = """
import sys
from pathlib import Path
from tunegraph.context import StageContext, seed_everything
from tunegraph.tasks.merge import MergeParams, merge
work, out = Path(sys.argv[1]), Path(sys.argv[2])
params = MergeParams.model_validate({params!r})
seed_everything({seed}, 2)
ctx = StageContext(stage="merged", seed={seed}, threads=2, workspace=work)
merge(params, {{"models": {{"expert_a": work / "expert_a", "expert_b": work / "expert_b"}}, "base": work / "base"}},
      out, ctx)
"""


def prepare(work: Path) -> None:
    """base/ (the converted embedded model) and expert_a/, expert_b/ (base + seeded noise), once."""
    import torch
    from safetensors.torch import load_file, save_file

    from tunegraph.models import model_files, resolve_model

    if all((work / name / "model.safetensors").is_file() for name in ("base", "expert_a", "expert_b")):
        return
    source = resolve_model(MODEL, work)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work / "base")
    base = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in ("expert_a", "expert_b"):
        (work / name).mkdir()
        for path in model_files(source):
            if path.name != "model.safetensors":
                shutil.copyfile(path, work / name / path.name)
        state = {k: (v + 0.002 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in base.items()}
        save_file(state, work / name / "model.safetensors", metadata={"format": "pt"})


def config_file(work: Path) -> Path:
    """The stage's mergekit configuration, with the checkpoints' paths, as the CLI reads it."""
    from tunegraph.mergekit_config import merge_config, with_paths
    from tunegraph.tasks.merge import MergeParams

    params = MergeParams.model_validate(PARAMS)
    config = merge_config(params.method, list(params.models), "base", params.models, params.parameters, params.dtype)
    path = work / "ties.yml"
    path.write_text(with_paths(config, {n: work / n for n in ("base", "expert_a", "expert_b")}).to_yaml() + "\n")
    return path


def timed(command: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def in_process(work: Path, config: Path) -> tuple[float, float, float, float]:
    """(stage s, stage peak MiB, run_merge s, run_merge peak MiB) in this process, imports done first."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from tunegraph.context import StageContext
    from tunegraph.tasks.merge import MergeParams, merge

    def stage_call():
        out = work / "out_inproc_stage"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        merge(MergeParams.model_validate(PARAMS), {"models": {"expert_a": work / "expert_a",
                                                              "expert_b": work / "expert_b"}, "base": work / "base"},
              out, StageContext(stage="merged", seed=SEED, threads=2, workspace=work))

    def api_call():
        out = work / "out_inproc_api"
        shutil.rmtree(out, ignore_errors=True)
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(out),
                  MergeOptions(random_seed=SEED, quiet=True))

    api_call()  # warm the page cache and lazy imports for both
    api, stage = measure(api_call), measure(stage_call)
    return stage.seconds, stage.peak_extra_mib, api.seconds, api.peak_extra_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunegraph-bench-merge"),
                        help="where the checkpoints and outputs go (~1.6 GB)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    args = parser.parse_args()
    work = args.work.resolve()
    prepare(work)
    config = config_file(work)
    python = sys.executable
    cli = [str(Path(python).parent / "mergekit-yaml"), str(config), str(work / "out_cli"), "--random-seed", str(SEED)]
    child = [python, "-P", "-c", STAGE_CHILD.format(params=PARAMS, seed=SEED), str(work), str(work / "out_stage")]
    cli_s, stage_s = [], []
    for _ in range(args.repeats):
        cli_s.append(timed(cli, work / "out_cli"))
        stage_s.append(timed(child, work / "out_stage"))
    same = (work / "out_cli/model.safetensors").read_bytes() == (work / "out_stage/model.safetensors").read_bytes()
    stage_in, stage_peak, api_in, api_peak = in_process(work, config)

    print(f"TIES merge of two {MODEL} checkpoints onto the base (density 0.5); {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}; fastest of {args.repeats}")
    print(f"{'run':<44}{'wall s':>9}{'vs CLI':>9}")
    print(f"{'mergekit-yaml (fresh process)':<44}{min(cli_s):>9.1f}{'1.00x':>9}")
    print(f"{'tunegraph merge stage (fresh process)':<44}{min(stage_s):>9.1f}{ratio(min(stage_s), min(cli_s)):>9}")
    print(f"{'in process: mergekit run_merge':<44}{api_in:>9.1f}{'':>9}   peak extra {api_peak:.0f} MiB")
    print(f"{'in process: tunegraph merge stage':<44}{stage_in:>9.1f}{ratio(stage_in, api_in):>9} of run_merge"
          f"   peak extra {stage_peak:.0f} MiB")
    print(f"all runs, CLI: {', '.join(f'{s:.1f}' for s in cli_s)}; stage: {', '.join(f'{s:.1f}' for s in stage_s)}")
    print(f"merged weights byte-identical (stage vs CLI): {same}")


if __name__ == "__main__":
    main()
