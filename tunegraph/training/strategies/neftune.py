"""NEFTune (Jain et al. 2023, https://arxiv.org/abs/2310.05914): noisy input embeddings while training.

    e~ = e + (alpha / sqrt(L * d)) * eps,    eps ~ U(-1, 1)^{L x d}

with L the sequence length and d the embedding size. A forward hook on the input embedding layer
adds the noise in training mode only (eval mode, generation and reference log-probs see clean
embeddings); the hook exists only inside :func:`neftune`, so saved models never carry it.
L is the padded batch length, as in transformers/TRL (the authors' script uses each example's
unpadded length; with right padding the two differ only for rows shorter than the batch).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch


def neftune_scale(alpha: float, length: int, dim: int) -> float:
    """Half-width of the uniform noise: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(length * dim)


def make_neftune_hook(alpha: float):
    def hook(module, args, output):
        if not module.training:
            return output
        bound = neftune_scale(alpha, output.shape[-2], output.shape[-1])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return hook


@contextmanager
def neftune(model, alpha: float | None):
    """Noise the input embeddings of ``model`` while the block runs (no-op when alpha is falsy)."""
    if not alpha:
        yield
        return
    handle = model.get_input_embeddings().register_forward_hook(make_neftune_hook(alpha))
    try:
        yield
    finally:
        handle.remove()
