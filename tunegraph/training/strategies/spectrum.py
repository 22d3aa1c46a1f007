"""Spectrum (Hartford et al. 2024, https://arxiv.org/abs/2406.06623): train only the layers whose weight
matrices carry the most signal, judged by random-matrix theory.

For a weight W (n x m, n >= m) modelled as signal + i.i.d. noise of entry std sigma, the noise
singular values fill the Marchenko–Pastur bulk whose upper edge is

    bound = sigma * (sqrt(n) + sqrt(m)) = sigma * sqrt(n) * (1 + sqrt(beta)),   beta = m / n.

Singular values above the bound are signal, the rest noise:

    SNR(W) = sum_{s_k > bound} s_k / sum_{s_k <= bound} s_k.

sigma is estimated from the matrix itself, robustly to a low-rank signal, from the median singular
value (Gavish & Donoho 2014): sigma = s_med / sqrt(n * mu_beta), mu_beta being the median of the MP
law with ratio beta. (The reference tool, github.com/cognitivecomputations/spectrum, uses
IQR(s) / 1.349 as "sigma" directly in singular-value units with bound sigma * (1 + sqrt(beta)), and
ranks by SNR divided by the top singular value; that heuristic calls a good part of a pure Gaussian
matrix's spectrum "signal", so the scale-correct bound above is used and SNR is not rescaled.)

Per module type (``self_attn.q_proj``, ``mlp.down_proj``, ...) the top ``fraction`` of layers by SNR
train; everything else is frozen, except the embeddings/LM head when ``train_embeddings`` (the
reference tool always unfreezes them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from tunegraph.params import StageParams

SPECTRUM_FILE = "spectrum.json"
_LAYER = re.compile(r"^(?P<prefix>.*?\.)(?P<index>\d+)\.(?P<type>.+)$")


class SpectrumSettings(StageParams):
    fraction: float = Field(0.25, gt=0, le=1, description="share of layers trained per module type (top SNR)")
    train_embeddings: bool = Field(True, description="also train the input embeddings and LM head (as the "
                                                     "reference Spectrum tool does)")


@lru_cache(maxsize=256)
def mp_median(beta: float) -> float:
    """Median of the Marchenko–Pastur law (unit variance, ratio 0 < beta <= 1) on
    [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2], by quadrature after lambda = a + (b - a) sin^2(phi),
    which makes the integrand smooth (no edge singularities even at beta = 1)."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    phi = np.linspace(0.0, math.pi / 2, 20001)
    lam = lo + (hi - lo) * np.sin(phi) ** 2
    # density sqrt((hi - lam)(lam - lo)) / (2 pi beta lam), times d lambda / d phi; sin^2 / lam -> 1 / (hi - lo)
    # at phi = 0 when lo = 0 (beta = 1)
    sin2_over_lam = np.divide(np.sin(phi) ** 2, lam, out=np.full_like(lam, 1 / (hi - lo)), where=lam > 0)
    integrand = (hi - lo) ** 2 * 2 * sin2_over_lam * np.cos(phi) ** 2 / (2 * math.pi * beta)
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(phi))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, lam))


@dataclass(frozen=True)
class SNR:
    snr: float
    sigma: float  # estimated noise std of one entry
    bound: float  # MP upper edge in singular-value units
    n_signal: int  # singular values above the bound


def spectrum_snr(weight: torch.Tensor) -> SNR:
    """Signal-to-noise ratio of a 2-D matrix's singular values against the Marchenko–Pastur edge."""
    if weight.ndim != 2:
        raise ValueError(f"spectrum_snr needs a 2-D matrix, got shape {tuple(weight.shape)}")
    s = torch.linalg.svdvals(weight.detach().to(torch.float64))
    n, m = max(weight.shape), min(weight.shape)
    sigma = float(s.median()) / math.sqrt(n * mp_median(m / n))
    bound = sigma * (math.sqrt(n) + math.sqrt(m))
    signal, noise = float(s[s > bound].sum()), float(s[s <= bound].sum())
    snr = signal / noise if noise > 0 else math.inf
    return SNR(snr, sigma, bound, int((s > bound).sum()))


def layer_linears(model) -> dict[str, list[tuple[int, str]]]:
    """Linear modules inside numbered blocks, by type: ``{"self_attn.q_proj": [(0, full name), ...]}``."""
    by_type: dict[str, list[tuple[int, str]]] = {}
    for name, module in model.named_modules():
        match = _LAYER.match(name)
        if match and isinstance(module, torch.nn.Linear):
            by_type.setdefault(match["type"], []).append((int(match["index"]), name))
    return by_type


@dataclass(frozen=True)
class SpectrumSelection:
    fraction: float
    selected: list[str]  # module names that train
    snr: dict[str, float]  # every scanned module
    trainable: list[str]  # parameter names left trainable

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "selected": self.selected, "trainable_parameters": self.trainable,
                "snr": {name: (value if math.isfinite(value) else None) for name, value in self.snr.items()}}


def select_layers(model, fraction: float) -> tuple[list[str], dict[str, float]]:
    """Top ``fraction`` of layers per module type by SNR (at least one each; ties by name)."""
    selected, scores = [], {}
    for _type, layers in sorted(layer_linears(model).items()):
        ranked = []
        for _, name in layers:
            scores[name] = spectrum_snr(model.get_submodule(name).weight).snr
            ranked.append((-scores[name], name))
        keep = max(1, int(fraction * len(layers) + 0.5))
        selected += [name for _, name in sorted(ranked)[:keep]]
    return sorted(selected), dict(sorted(scores.items()))


def apply_spectrum(model, settings: SpectrumSettings, also_train: tuple[str, ...] = ()) -> SpectrumSelection:
    """Freeze everything, then unfreeze the selected modules (and embeddings if asked, and the modules
    named in ``also_train``, e.g. a reward model's new score head)."""
    selected, scores = select_layers(model, settings.fraction)
    if not selected:
        raise ValueError("spectrum found no linear layers inside numbered blocks to select from")
    model.requires_grad_(False)
    for name in selected:
        model.get_submodule(name).requires_grad_(True)
    if settings.train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().requires_grad_(True)
    for name in also_train:
        model.get_submodule(name).requires_grad_(True)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    return SpectrumSelection(settings.fraction, selected, scores, trainable)


def save_spectrum(selection: SpectrumSelection, out: Path) -> Path:
    path = Path(out) / SPECTRUM_FILE
    path.write_text(json.dumps(selection.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
