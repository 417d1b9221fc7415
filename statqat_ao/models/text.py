"""Real English text that ships with Python, split for language-model training and evaluation.

``pydoc_data.topics`` holds the documentation behind ``help()`` (about 0.5 MB of English
with code, some 110k SmolLM2 tokens). It is tokenized once as one stream; the tail is cut
into held-out windows and everything before it is training text, so no held-out token is
ever trained on or used for calibration.

Example:
    >>> from statqat_ao.models import load_smollm2, pydoc_split
    >>> _, tokenizer = load_smollm2()  # doctest: +SKIP
    >>> split = pydoc_split(tokenizer)  # doctest: +SKIP
    >>> split.held_out.shape  # doctest: +SKIP
    torch.Size([16, 256])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm


def pydoc_text() -> str:
    """Every topic of ``pydoc_data.topics``, in the module's order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


@dataclass(frozen=True)
class TextSplit:
    """Token ids: a training stream, and held-out windows taken from the text's end."""

    train: torch.Tensor  # [T] int64
    held_out: torch.Tensor  # [N, window] int64

    def train_batches(self, batch: int, window: int, steps: int, seed: int = 0):
        """``steps`` batches ``[batch, window]`` of random windows of the training stream."""
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(self.train) - window, (steps, batch), generator=generator)
        offsets = torch.arange(window)
        for row in starts:
            yield self.train[row[:, None] + offsets]

    def calibration(self, tokens: int, window: int) -> torch.Tensor:
        """The first ``tokens`` training tokens as ``[tokens // window, window]``."""
        rows = tokens // window
        return self.train[: rows * window].reshape(rows, window)


def pydoc_split(tokenizer, window: int = 256, held_out_windows: int = 16) -> TextSplit:
    """Tokenize :func:`pydoc_text` and hold out its last ``held_out_windows`` windows.

    Raises:
        ValueError: the text is too short for the requested held-out windows.
    """
    ids = torch.tensor(tokenizer(pydoc_text())["input_ids"], dtype=torch.long)
    held = window * held_out_windows
    if held >= len(ids) // 2:
        raise ValueError(f"{held_out_windows} windows of {window} tokens is over half of the {len(ids)}-token text")
    return TextSplit(train=ids[:-held], held_out=ids[-held:].reshape(held_out_windows, window))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 4, progress: bool = False, desc: str = "perplexity") -> float:
    """exp(mean next-token cross entropy) of a causal LM over ``windows`` ``[N, T]``.

    Each window is scored on its own (tokens 2..T given the ones before), in eval mode, so
    every model is measured on exactly the same predictions.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    chunks = windows.split(batch)
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        target = chunk[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(loss)
        count += target.numel()
    model.train(was_training)
    return math.exp(total / count)
