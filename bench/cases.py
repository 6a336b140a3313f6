"""What one measurement is about: the shapes (a :class:`Case`) and its input tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One point of a sweep.

    Attributes:
        sweep: name of the sweep (one table and one plot per sweep).
        x: the field the sweep varies (``"tokens"``, ``"hidden"``, ``"chunk"``, ...).
        device, dtype: ``"cpu"``/``"cuda"`` and ``"fp32"``/``"bf16"``.
        tokens, hidden, vocab: N, H (student and teacher) and V.
        chunk: tokens per chunk for every chunked implementation.
        impls: names of the implementations measured at this point.
        source: ``"random"`` (:func:`make_inputs`' synthetic tensors) or ``"smollm2"``
            (a real model's hidden states and head: ``real_inputs.py``).
    """

    sweep: str
    x: str
    device: str
    dtype: str
    tokens: int
    hidden: int
    vocab: int
    chunk: int
    impls: tuple[str, ...]
    source: str = "random"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def describe(self) -> dict:
        """The fields that go into every result record."""
        out = asdict(self)
        del out["impls"]
        return out

    def label(self) -> str:
        return f"N={self.tokens} H={self.hidden} V={self.vocab} chunk={self.chunk}"


@dataclass
class Inputs:
    """Student hidden/weight (receive gradients) and teacher hidden/weight (frozen)."""

    hs: torch.Tensor
    ws: torch.Tensor
    ht: torch.Tensor
    wt: torch.Tensor

    def clear_grads(self) -> None:
        self.hs.grad = None
        self.ws.grad = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hs, self.ws, self.ht, self.wt))


def make_inputs(case: Case, seed: int = 0, device: str | None = None) -> Inputs:
    """Deterministic inputs for ``case`` (the same in every process for a given seed).

    Logits have a standard deviation of about 2 (student) and 3 (teacher); each teacher
    token is scaled by a random factor in [0.25, 2] so that the teacher entropy, and
    with it the gate, spreads over the whole [0, 1] range instead of one value. A case of
    another ``source`` is refused: ``real_inputs.inputs_for`` makes every case's inputs.
    """
    if case.source != "random":
        raise ValueError(f"make_inputs makes random inputs, not {case.source!r} ones: "
                         "use real_inputs.inputs_for")
    gen = torch.Generator().manual_seed(seed)
    n, h, v = case.tokens, case.hidden, case.vocab

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen).mul_(std)

    hs = randn(n, h)
    ws = randn(v, h, std=2.0 / h**0.5)
    ht = randn(n, h).mul_(torch.rand(n, 1, generator=gen).mul_(1.75).add_(0.25))
    wt = randn(v, h, std=3.0 / h**0.5)
    dev = device or case.device
    dtype = case.torch_dtype

    def place(t, grad=False):
        return t.to(device=dev, dtype=dtype).requires_grad_(grad)

    return Inputs(place(hs, True), place(ws, True), place(ht), place(wt))
