"""Helpers of the served tests (tests/served/)."""

from __future__ import annotations

import torch


def padded(seqs: list[list[int]], side: str, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` token ids and 0/1 attention mask of ``seqs`` padded on ``side``."""
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad, dtype=torch.int64)
    mask = torch.zeros(len(seqs), length, dtype=torch.int64)
    for b, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[b, where] = torch.tensor(s)
        mask[b, where] = 1
    return ids, mask
