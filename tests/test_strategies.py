"""Every update strategy through the real ``sft`` stage on the tiny model (two steps, finite loss, and
exactly the parameters the strategy names change), plus the Spectrum SNR math and NEFTune's noise."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import stage_ctx
from tunegraph.modelio import load_model
from tunegraph.tasks.sft import SFTParams, sft
from tunegraph.training.strategies import STRATEGIES, load_base, load_with_adapter, neftune
from tunegraph.training.strategies.neftune import neftune_scale
from tunegraph.training.strategies.spectrum import mp_median, spectrum_snr

RUN = dict(max_steps=2, batch_size=4, learning_rate=1e-3, max_length=128)
SMALL_LORA = {"r": 4, "alpha": 8}
IDS = torch.tensor([[1, 28, 339, 4123, 30, 2, 991, 17], [1, 50, 60, 70, 80, 90, 100, 110]])


def run_sft(tiny_artifacts, out, **params):
    result = sft(SFTParams(**RUN, **params), {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"},
                 out, stage_ctx(out, "sft"))
    assert result.metrics["steps"] == 2
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(result.metrics["first_loss"])
    before = load_file(tiny_artifacts / "model" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(t.dtype == torch.float32 for t in after.values())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    return before, after, changed, result.metrics


def linear_weights(state: dict, *suffixes: str) -> set[str]:
    return {name for name in state if name.endswith(tuple(f"{s}.weight" for s in suffixes))}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def test_strategy_list():
    assert STRATEGIES == ("full", "lora", "qlora", "dora", "galore", "spectrum", "ia3", "prefix_tuning",
                          "prompt_tuning", "p_tuning")


def test_apply_strategy_keeps_its_original_call(tiny_artifacts):
    from tunegraph.training.strategies import LoraSettings, apply_strategy

    model = apply_strategy(load_model(tiny_artifacts / "model"), "lora", LoraSettings(r=2))
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"default"}
    with pytest.raises(ValueError, match="qlora needs a 4-bit base"):
        apply_strategy(load_model(tiny_artifacts / "model"), "qlora")


def test_dora_changes_only_linears(tiny_artifacts, tmp_path):
    before, _, changed, _ = run_sft(tiny_artifacts, tmp_path, strategy="dora", lora=SMALL_LORA)
    assert changed == linear_weights(before, "proj")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in adapter)


def test_qlora_merges_into_float32_and_matches_the_adapter_model(tiny_artifacts, tmp_path):
    from peft import PeftModel

    before, _, changed, _ = run_sft(tiny_artifacts, tmp_path, strategy="qlora", lora=SMALL_LORA)
    assert changed == linear_weights(before, "proj")  # every quantized Linear is a LoRA target (all-linear)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    merged = logits(load_model(tmp_path))
    adapted = logits(PeftModel.from_pretrained(load_base(tiny_artifacts / "model", "qlora"), tmp_path / "adapter"))
    # same function: dequant(W_NF4) + (alpha/r) B A in float32 either way; only summation order differs
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=0), (merged - adapted).abs().max()
    assert not torch.allclose(merged, logits(load_model(tiny_artifacts / "model")), atol=1e-4)


def test_galore_moves_every_tensor_with_low_rank_matrix_updates(tiny_artifacts, tmp_path):
    before, after, changed, _ = run_sft(tiny_artifacts, tmp_path, strategy="galore", galore={"rank": 4})
    assert changed == set(before)  # full-parameter training: embeddings and norms too
    assert not (tmp_path / "adapter").exists()
    # both steps share the first projection (update_proj_gap 200): each matrix moved inside a rank-4 space
    for name in linear_weights(before, "proj"):
        assert torch.linalg.matrix_rank(after[name] - before[name], rtol=1e-4) <= 4, name
    embedding = "model.embed_tokens.weight"
    assert torch.linalg.matrix_rank(after[embedding] - before[embedding], rtol=1e-4) > 4  # plain AdamW


def test_spectrum_trains_only_the_selected_layers(tiny_artifacts, tmp_path):
    _, _, changed, _ = run_sft(tiny_artifacts, tmp_path, strategy="spectrum", spectrum={"train_embeddings": False})
    report = json.loads((tmp_path / "spectrum.json").read_text())
    assert len(report["snr"]) == 14 and len(report["selected"]) == 7  # 7 Linear types x 2 layers; top 25% -> 1 each
    assert {name.split(".", 3)[3] for name in report["selected"]} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"}
    assert changed == {f"{name}.weight" for name in report["selected"]} == set(report["trainable_parameters"])


def test_ia3_merges_its_scaling_vectors(tiny_artifacts, tmp_path):
    before, _, changed, plain = run_sft(tiny_artifacts, tmp_path / "plain", strategy="ia3")
    assert changed == linear_weights(before, "k_proj", "v_proj", "down_proj")  # peft's llama defaults
    assert (tmp_path / "plain" / "adapter" / "adapter_model.safetensors").is_file()
    # NEFTune works under any strategy: the same run with noisy embeddings sees another first loss
    _, _, noisy, metrics = run_sft(tiny_artifacts, tmp_path / "noisy", strategy="ia3", neftune_alpha=5.0)
    assert noisy == changed and metrics["first_loss"] != plain["first_loss"]


@pytest.mark.parametrize("strategy", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_prompt_style_keeps_the_base_and_needs_the_adapter(tiny_artifacts, tmp_path, strategy):
    _, _, changed, _ = run_sft(tiny_artifacts, tmp_path, strategy=strategy, prompt={"num_virtual_tokens": 4})
    assert changed == set()  # nothing merges: the weights are the base's
    note = json.loads((tmp_path / "requires_adapter.json").read_text())
    assert note["adapter"] == "adapter" and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base, tuned = logits(load_model(tmp_path)), logits(load_with_adapter(tmp_path))
    assert tuned.shape == base.shape  # virtual-token positions are not in the logits
    assert torch.isfinite(tuned).all() and not torch.allclose(tuned, base, atol=1e-4)


def test_prompt_tuning_under_a_preference_objective(tiny_artifacts, tmp_path):
    """Objectives that read logits against their own labels see [B, L, vocab] under prompt tuning."""
    from tunegraph.registry import all_kinds

    kind = all_kinds()["dpo"]
    params = kind.params_model(strategy="prompt_tuning", prompt={"num_virtual_tokens": 4}, **RUN)
    result = kind.fn(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "pairs"}, tmp_path,
                     stage_ctx(tmp_path, "dpo"))
    assert math.isfinite(result.metrics["train_loss"])


# --- Spectrum SNR ------------------------------------------------------------------------------------

def test_marchenko_pastur_median():
    assert mp_median(1.0) == pytest.approx(0.6528, abs=2e-4)  # Gavish & Donoho 2014, square case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 300, generator=g, dtype=torch.float64)
    empirical = torch.linalg.eigvalsh(x.T @ x / 1200).median()
    assert float(empirical) == pytest.approx(mp_median(0.25), rel=0.01)


def test_gaussian_matrix_has_no_signal_and_a_planted_one_does():
    g = torch.Generator().manual_seed(1)
    noise = 0.02 * torch.randn(128, 64, generator=g)
    pure = spectrum_snr(noise)
    assert pure.snr < 0.1 and pure.sigma == pytest.approx(0.02, rel=0.05)
    u, _ = torch.linalg.qr(torch.randn(128, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, 8, generator=g))
    planted = spectrum_snr(noise + 10 * pure.bound * u @ v.T)  # 8 directions at 10x the MP edge
    assert planted.n_signal == 8 and planted.snr > 1
    assert spectrum_snr(3 * noise.T).snr == pytest.approx(pure.snr)  # scale- and transpose-invariant


# --- NEFTune -----------------------------------------------------------------------------------------

class _Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 64)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        return self.embed(ids)


def test_neftune_noise_scale_and_eval_mode():
    torch.manual_seed(0)
    model, ids = _Embedder(), torch.randint(0, 100, (8, 10))
    clean = model(ids).detach()
    bound = neftune_scale(5.0, 10, 64)
    assert bound == pytest.approx(5.0 / math.sqrt(640))
    with neftune(model, 5.0):
        noise = model.train()(ids).detach() - clean
        assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.99 * bound
        assert float(noise.abs().mean()) == pytest.approx(bound / 2, rel=0.03)  # E|U(-b, b)| = b / 2
        assert torch.equal(model.eval()(ids), clean)  # eval mode: no noise
    assert not model.embed._forward_hooks  # removed on exit: the saved model is clean
    assert torch.equal(model.train()(ids), clean)
    with neftune(model, None):
        assert torch.equal(model(ids), clean)
