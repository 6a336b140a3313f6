"""How far below the true teacher entropy the bucketed (top-k + tail) entropy is.

    python bench/topk_entropy.py

Prints, for a few next-token distributions over V = 128,256 (Zipf ``p_r ~ r^-s`` and the
softmax of N(0, sigma^2) logits), the true entropy, the bucketed one at k = 8, 32, 256
(the gate's default with a top-k teacher: a lower bound) and the tail mass. The upper
bound ``H_bucket + Q_tail log(V - k)`` (a uniform tail) is printed too.
"""

from __future__ import annotations

import math

import torch

V = 128256
KS = (8, 32, 256)


def entropy(p: torch.Tensor) -> float:
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def bucketed(p: torch.Tensor, k: int) -> tuple[float, float]:
    """The bucketed entropy and the tail mass of ``p``'s top-k."""
    top = p.topk(k).values
    tail = float((1 - top.sum()).clamp_min(0))
    return float(-(top * top.log()).sum()) - (tail * math.log(tail) if tail > 0 else 0.0), tail


def teachers() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    r = torch.arange(1, V + 1, dtype=torch.float64)
    out = {}
    for sigma in (8.0, 6.0, 4.0):
        out[f"softmax sigma={sigma:g}"] = torch.softmax(
            torch.randn(V, generator=gen, dtype=torch.float64) * sigma, 0)
    for s in (1.6, 1.1):
        p = r.pow(-s)
        out[f"zipf s={s:g}"] = p / p.sum()
    return out


def main() -> None:
    print(f"V = {V}; per k: bucketed entropy [upper bound] (tail mass)")
    for name, p in teachers().items():
        cells = []
        for k in KS:
            h, tail = bucketed(p, k)
            cells.append(f"k={k}: {h:.2f} [{h + tail * math.log(V - k):.2f}] ({tail:.2f})")
        print(f"{name:18s} H={entropy(p):.2f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
