"""`tunegraph report`: a self-contained HTML page of a flow run, read back from a real MLflow store,
checked as HTML and rendered by headless Chromium (its images must decode)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import make_tiny_workspace, run_cli, stage_ctx
from tunegraph.data.data_card import CardInputs, write_data_card
from tunegraph.data.removals import Funnel, Removal
from tunegraph.errors import TunegraphError
from tunegraph.report import collect_run, find_flow_run, render_html

T0 = 1_700_000_000_000  # ms; runs get explicit times so the timeline is what the test says
SUMMARY = {"evaluate": ("exact_match", "perplexity"), "sft": ("train_loss",)}
EVAL_KINDS = {"evaluate"}


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def images_of(page: str) -> list[dict]:
    parser = _Images()
    parser.feed(page)
    return parser.images


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _stage(client, experiment_id, parent, name, kind, status, start_s, end_s, metrics=None, steps=None,
           upstream=None, fingerprint=None, artifact=None, content_hash=None, origin_s=0):
    """A stage run of flow run ``parent``, from ``start_s`` to ``end_s`` after ``origin_s`` (the flow's start)."""
    tags = {"tunegraph.role": "stage", "tunegraph.stage": name, "tunegraph.kind": kind, "tunegraph.status": status,
            "tunegraph.fingerprint": fingerprint or f"fp-{name}-{parent[:6]}", "mlflow.parentRunId": parent}
    tags.update({f"tunegraph.upstream.{slot}": f"{up}@hash-{up}" for slot, up in (upstream or {}).items()})
    if artifact is not None:
        tags.update({"tunegraph.artifact": str(artifact), "tunegraph.content_hash": content_hash or ""})
    run = client.create_run(experiment_id, run_name=name, start_time=T0 + int((origin_s + start_s) * 1000), tags=tags)
    for step, values in enumerate(steps or []):
        for key, value in values.items():
            client.log_metric(run.info.run_id, key, value, timestamp=T0 + step, step=step)
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value, timestamp=T0 + 10_000, step=0)
    client.set_terminated(run.info.run_id, end_time=T0 + int((origin_s + end_s) * 1000))
    return run.info.run_id


def _data_card(directory: Path) -> None:
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question {i} " * (i + 1)},
                                         {"role": "assistant", "content": f"answer {i}"}]} for i in range(6)]
    funnel = Funnel(rows_in=6)
    funnel.record("exact_dedup", 5, [Removal("r5", "exact_duplicate", "same as r4")])
    funnel.record("length", 4, [Removal("r0", "too_short", "2 words")])
    write_data_card(directory, CardInputs("clean_data", funnel, rows, rows[1:5]))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_artifacts):
    """Two flow runs of experiment "demo": the first ran base/clean_data/sft; the second (newest) has them
    cached and ran two evaluate stages — eval_base's scores are a real evaluate stage's scores.json."""
    from tunegraph.tasks.evaluate import EvaluateParams, evaluate

    root = tmp_path_factory.mktemp("report")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.create_experiment("demo", artifact_location=(root / "mlartifacts").as_uri())

    first = client.create_run(experiment_id, run_name="first", start_time=T0, tags={"tunegraph.role": "flow"}).info.run_id
    _stage(client, experiment_id, first, "base", "import_model", "ran", 1, 3, {"parameters": 3.2e6},
           fingerprint="fp-base")
    card_dir = root / "card"
    card_dir.mkdir()
    _data_card(card_dir)
    data_run = _stage(client, experiment_id, first, "clean_data", "filter_data", "ran", 3, 5, {"rows": 4.0},
                      fingerprint="fp-data")
    for name in ("data_card.json", "length_histogram.png"):
        client.log_artifact(data_run, str(card_dir / name))
    sft_steps = [{"loss": 2.0 - 0.3 * s, "reward": 0.1 * s, "kl": 0.01 * s, "lr": 1e-3, "tokens_per_s": 900.0 + s}
                 for s in range(5)]
    sft_first = _stage(client, experiment_id, first, "sft", "sft", "ran", 5, 20, {"train_loss": 0.9, "steps": 5.0},
                       steps=sft_steps, upstream={"model": "base", "dataset": "clean_data"}, fingerprint="fp-sft")
    client.set_terminated(first, end_time=T0 + 21_000)

    eval_dir = root / "eval_base"
    eval_dir.mkdir()
    evaluate(EvaluateParams(max_new_tokens=4, limit=3), {"model": tiny_artifacts / "model",
                                                          "dataset": tiny_artifacts / "eval"}, eval_dir,
             stage_ctx(root, "eval_base"))
    scores = json.loads((eval_dir / "scores.json").read_text())
    (eval_dir / "manifest.json").write_text(json.dumps({"content_hash": "hash-eval-base"}))

    start2 = 60
    second = client.create_run(experiment_id, run_name="second", start_time=T0 + start2 * 1000,
                               tags={"tunegraph.role": "flow", "mlflow.source.git.commit": "abc123"}).info.run_id
    _stage(client, experiment_id, second, "base", "import_model", "cached", 1, 1.1, {"parameters": 3.2e6},
           fingerprint="fp-base", origin_s=start2)
    _stage(client, experiment_id, second, "clean_data", "filter_data", "cached", 1.2, 1.3, {"rows": 4.0},
           fingerprint="fp-data", artifact=root / "gone", content_hash="x", origin_s=start2)  # not on disk: from MLflow
    _stage(client, experiment_id, second, "sft", "sft", "cached", 1.4, 1.5, {"train_loss": 0.9, "steps": 5.0},
           upstream={"model": "base", "dataset": "clean_data"}, fingerprint="fp-sft", origin_s=start2)
    _stage(client, experiment_id, second, "eval_base", "evaluate", "ran", 2, 8, scores,
           upstream={"model": "base", "dataset": "clean_data"}, artifact=eval_dir, content_hash="hash-eval-base", origin_s=start2)
    sft_scores = {"exact_match": 0.5, "contains_match": 0.75, "perplexity": 3.0, "loss": 1.1, "rows": 3.0}
    _stage(client, experiment_id, second, "eval_sft", "evaluate", "ran", 8, 14, sft_scores,
           upstream={"model": "sft", "dataset": "clean_data"}, origin_s=start2)
    _stage(client, experiment_id, second, "eval_sft_b", "evaluate", "ran", 14, 19,
           {"exact_match": 0.25, "delta_exact_match": -0.25},
           upstream={"model": "sft", "dataset": "clean_data", "baseline": "eval_sft"}, origin_s=start2)
    client.set_terminated(second, end_time=T0 + (start2 + 20) * 1000)
    return {"client": client, "first": first, "second": second, "scores": scores, "sft_first": sft_first}


def test_collects_the_newest_flow_run_with_curves_cards_and_scores_of_cached_stages(store):
    view = collect_run(store["client"], "demo", "demo", None)
    assert view.run_id == store["second"] and view.git_commit == "abc123"
    assert [s.name for s in view.stages] == ["base", "clean_data", "sft", "eval_base", "eval_sft", "eval_sft_b"]
    stages = {s.name: s for s in view.stages}
    sft = stages["sft"]
    assert sft.status == "cached" and sft.source_run == store["sft_first"]  # the run that produced it
    assert set(sft.curves) == {"loss", "reward", "kl", "lr"}  # step metrics; speed is not a curve
    assert sft.curves["loss"] == [(s, pytest.approx(2.0 - 0.3 * s)) for s in range(5)]
    card = stages["clean_data"].data_card  # cached, artifact dir gone: from the producing run's MLflow files
    assert card["funnel"]["rows_in"] == 6 and card["funnel"]["rows_out"] == 4
    assert png_size(stages["clean_data"].card_plots["length_histogram.png"])[0] > 0
    assert stages["eval_base"].metrics == pytest.approx(store["scores"])
    assert stages["eval_base"].start_s == pytest.approx(2.0) and stages["eval_base"].end_s == pytest.approx(8.0)


def test_html_is_self_contained_and_every_image_is_a_png(store):
    view = collect_run(store["client"], "demo", "demo", None)
    page = render_html(view, SUMMARY, EVAL_KINDS)
    images = images_of(page)
    alts = [img["alt"] for img in images]
    # timeline, sft curves, funnel + the card's own histogram, eval chart
    assert alts == ["stage timeline", "sft per-step metrics", "clean_data data funnel",
                    "clean_data length_histogram.png", "eval scores per stage"]
    for img in images:
        assert img["src"].startswith("data:image/png;base64,")
        width, height = png_size(base64.b64decode(img["src"].split(",", 1)[1]))
        assert width > 100 and height > 50
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing loaded from elsewhere
    assert "<script" not in page
    base_em = store["scores"]["exact_match"]
    assert f"{0.5 - base_em:+.4g} vs eval_base" in page  # eval_sft against the base model's eval
    assert "-0.25 vs eval_sft" in page  # eval_sft_b's declared baseline
    assert "(base model)" in page and 'class="cached"' in page and "exact_dedup" in page


def test_flow_run_by_prefix_or_name_and_clear_errors(store):
    client = store["client"]
    assert find_flow_run(client, "demo", store["first"][:10]).info.run_id == store["first"]
    assert find_flow_run(client, "demo", "first").info.run_id == store["first"]
    with pytest.raises(TunegraphError, match="matches 0 flow runs"):
        find_flow_run(client, "demo", "zzzz")
    with pytest.raises(TunegraphError, match="no MLflow experiment 'nope'"):
        find_flow_run(client, "nope", None)


# ---------------------------------------------------------------- headless Chromium

# Test-only: the report itself has no script. This one records, once the page has loaded, whether
# each image decoded (naturalWidth is 0 for an image the browser could not decode).
_PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
          "img.setAttribute('data-natural-width', img.naturalWidth); "
          "document.body.setAttribute('data-probed', document.images.length); });</script>")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")


def rendered_image_widths(page: str, tmp_path: Path) -> dict[str, int]:
    """Load ``page`` in headless Chromium; alt -> naturalWidth of each image after load."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data-probed" in result.stdout, "the page did not finish loading"
    return {img["alt"]: int(img["data-natural-width"]) for img in images_of(result.stdout)}


def test_report_renders_in_headless_chromium_with_its_plots(store, tmp_path):
    page = render_html(collect_run(store["client"], "demo", "demo", None), SUMMARY, EVAL_KINDS)
    widths = rendered_image_widths(page, tmp_path)
    assert len(widths) == len(images_of(page)) == 5
    assert all(width > 100 for width in widths.values()), widths


@pytest.mark.slow
def test_report_of_a_real_run_renders_in_chromium(tmp_path):
    ws = make_tiny_workspace(tmp_path / "ws")
    ran = run_cli(["run", "recipe.yaml", "--parallel", "2"], cwd=ws)  # the 3 independent stages at once
    written = re.search(r"report:\s+(\S+\.html)", ran.stdout)
    assert written and (ws / written.group(1)).is_file()  # `tunegraph run` writes one

    run_cli(["report", "recipe.yaml", "-o", "report.html"], cwd=ws)
    page = (ws / "report.html").read_text(encoding="utf-8")
    for stage in ("base", "train_data", "eval_data", "sft", "eval_sft"):
        assert f"<td>{stage}</td>" in page
    widths = rendered_image_widths(page, tmp_path)
    assert {"stage timeline", "sft per-step metrics", "eval scores per stage"} <= set(widths)
    assert all(width > 100 for width in widths.values()), widths
