"""SFT packing: several encoded examples in one sequence of at most ``max_length`` tokens, each attending
only to itself.

Padding a batch to its longest example wastes compute on pad tokens; packing concatenates examples
instead. Examples go into sequences by best-fit decreasing (longest first, each into the fullest
sequence it still fits; TRL's ``packing_strategy="bfd"``), so no example is split. The result depends
only on the examples' lengths and order: it is deterministic.

Nothing leaks between the examples of a sequence: ``position_ids`` restart at 0 at each example, and
neither a 2D attention mask nor a KV cache is passed (``use_cache=False``, :func:`packed_loss`), as with
transformers' ``DataCollatorWithFlattening``. From such position
ids transformers (>= 5, ``masking_utils.find_packed_sequence_indices``) builds a block-diagonal causal
mask for the sdpa and eager attention of every model that builds its mask through ``create_causal_mask``
(llama, qwen2, gemma3, ... also on CPU), and flash-attention runs its variable-length kernel on the
same segments. Token t of example k then sees exactly what it sees unpacked:

    p(y_t | packed sequence) = p(y_t | x_k, y_k,<t)    (RoPE depends on t - s only; positions restart)

The first label of every example is masked as well (it would be predicted from the previous example's
last token; unpacked, nothing predicts it), so the loss of a packed micro batch is the same token mean
over the labelled (assistant) tokens as the padded batch of the same examples:

    L = -(1/|M|) sum_k sum_{t in M_k} log p(y_{k,t} | x_k, y_{k,<t}),    |M| = sum_k |M_k|

Prompt-style adapters (prefix, prompt and p-tuning) cannot be isolated this way: prefix tuning attends
through a key/value prefix, which turns transformers' packed-sequence detection off, and prompt and
p-tuning drop ``position_ids`` and prepend their virtual tokens to the first example only. Packing under
them is refused. NEFTune's noise scale alpha/sqrt(L d) uses the packed length L.
"""

from __future__ import annotations

import bisect

import torch

from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample

# strategies whose peft forward breaks the position-id isolation above
UNPACKABLE_STRATEGIES = ("prefix_tuning", "prompt_tuning", "p_tuning")


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into sequences of at most ``max_length`` tokens.

    Longest example first (ties: lower index first), each into the sequence with the least room that
    still holds it, else a new one. Each sequence lists its examples in dataset order; sequences are
    ordered by their first example."""
    if any(n > max_length for n in lengths):
        raise ValueError(f"an example is longer than max_length={max_length}; truncate before packing")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            bins.append([index])
            room, target = max_length - lengths[index], len(bins) - 1
        else:
            room, target = free.pop(slot)
            bins[target].append(index)
            room -= lengths[index]
        bisect.insort(free, (room, target))
    return sorted((sorted(members) for members in bins), key=lambda members: members[0])


def pack_examples(examples: list[EncodedExample], max_length: int) -> list[list[EncodedExample]]:
    """The examples grouped into packed sequences by :func:`pack`."""
    return [[examples[i] for i in members] for members in pack([len(e.input_ids) for e in examples], max_length)]


def collate_packed(rows: list[list[EncodedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per packed sequence, right-padded to the longest: ``input_ids``, ``labels`` and
    ``position_ids`` that restart at every example (no ``attention_mask``: the positions define the
    attention blocks). Each example's first label is masked; padding forms a block of its own, unlabelled."""
    flat = [([t for e in row for t in e.input_ids],
             [label for e in row for label in (IGNORE_INDEX, *e.labels[1:])],
             [p for e in row for p in range(len(e.input_ids))]) for row in rows]
    width = max(len(ids) for ids, _, _ in flat)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels, row_positions) in enumerate(flat):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        labels[row, :n] = torch.tensor(row_labels)
        positions[row, :n] = torch.tensor(row_positions)
        positions[row, n:] = torch.arange(width - n)  # a new block: the padding attends only to itself
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def packed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token loss over the labelled tokens of a :func:`collate_packed` batch.

    ``use_cache=False`` is needed for the isolation: with a cache (transformers creates one whenever
    ``config.use_cache``, in training mode too) the packed-sequence mask is not built and every token
    attends to all earlier examples of its row."""
    return model(**batch, use_cache=False).loss
