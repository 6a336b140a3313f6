"""Argument checks shared by every entry point: clear errors before any work."""

from __future__ import annotations

import torch

from .sharded import check_weight


def tensor(name: str, x: object, *, floating: bool = True, min_dim: int = 0) -> torch.Tensor:
    """``x`` must be a tensor (floating point if asked) with at least ``min_dim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    return x


def nonempty_vocab(name: str, x: torch.Tensor, dim: int = -1) -> None:
    """The vocabulary dim ``dim`` of ``x`` holds at least one column: the kernels cannot
    take an empty one (and no distribution lives on it)."""
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has an empty vocabulary dim (shape {tuple(x.shape)}): "
                         "the loss needs at least one vocabulary column")


def same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors live on one device."""
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def labels(x: object, token_shape: torch.Size) -> torch.Tensor | None:
    """A 0/1 or float weight mask with the token shape, or None."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"labels must be a real (0/1 or weight) mask, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(token_shape):
        raise ValueError(
            f"labels shape {tuple(x.shape)} != token shape {tuple(token_shape)} "
            "(the logits' shape without the vocabulary dim)"
        )
    if x.requires_grad:
        raise ValueError("labels is a constant mask and gets no gradient, but it requires "
                         "grad: pass labels.detach()")
    return x


def logits_pair(student: object, teacher: object, vocab_size: int | None = None, *,
                sharded: bool = False):
    """Student and teacher logits: floating tensors ``(..., V)`` of one shape; with
    ``vocab_size`` (one device), the same token shape and both widths ``>= vocab_size``."""
    tensor("student_logits", student, min_dim=1)
    tensor("teacher_logits", teacher, min_dim=1)
    if vocab_size is not None and not sharded:
        if student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(
                f"student_logits token shape {tuple(student.shape[:-1])} != teacher_logits "
                f"token shape {tuple(teacher.shape[:-1])}")
        vocab_fits(vocab_size, student_logits=student.shape[-1],
                   teacher_logits=teacher.shape[-1])
        return
    if student.shape != teacher.shape:
        hint = ("vocabulary shards must have one width on every rank and side" if sharded
                else "if the vocabularies are padded differently, pass vocab_size=<the real "
                "shared vocabulary>")
        raise ValueError(
            f"student_logits shape {tuple(student.shape)} != teacher_logits shape "
            f"{tuple(teacher.shape)} ({hint})"
        )


def vocab_fits(vocab_size: int, **widths: int) -> None:
    """Each named width (columns or rows) holds the first ``vocab_size`` columns."""
    for name, width in widths.items():
        if width < vocab_size:
            raise ValueError(f"vocab_size {vocab_size} > {name} vocabulary width {width}")


def linear(prefix: str, hidden: object, weight: object, bias: object) -> None:
    """Hidden ``(..., H)``, weight ``(V, H)``, bias ``(V,)`` of one linear head."""
    tensor(f"{prefix}_hidden", hidden, min_dim=1)
    check_weight(f"{prefix}_weight", weight)  # FSDP1 / ZeRO-3 layouts, and any empty weight
    tensor(f"{prefix}_weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            f"{prefix}_weight must be (vocab, hidden), got shape {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}_hidden width {hidden.shape[-1]} (shape {tuple(hidden.shape)}) != "
            f"{prefix}_weight width {weight.shape[1]} (shape {tuple(weight.shape)})"
        )
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        # Under autocast both are cast to the autocast dtype, as nn.Linear's would be.
        raise TypeError(
            f"{prefix}_hidden dtype {hidden.dtype} != {prefix}_weight dtype {weight.dtype} "
            "(outside torch.autocast they must match)"
        )
    if bias is not None:
        tensor(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{prefix}_bias shape {tuple(bias.shape)} != ({weight.shape[0]},) "
                f"(rows of {prefix}_weight)"
            )
        if bias.dtype != weight.dtype:
            raise ValueError(
                f"{prefix}_bias dtype {bias.dtype} != {prefix}_weight dtype {weight.dtype}"
            )


def teacher_source(
    teacher_hidden, teacher_weight, teacher_logits, teacher_bias, token_shape, vocab: int,
    vocab_size: int | None = None,
) -> None:
    """The teacher is given as hidden + weight (+ bias) or as logits: exactly one.

    ``vocab`` is the student's width; with ``vocab_size`` (one device) the teacher may have
    another width, ``>= vocab_size`` (checked, with the student's, here)."""
    has_linear = teacher_hidden is not None or teacher_weight is not None
    if has_linear and teacher_logits is not None:
        raise ValueError("give the teacher as teacher_hidden + teacher_weight OR teacher_logits, "
                         "not both")
    if not has_linear and teacher_logits is None:
        raise ValueError("the teacher is missing: give teacher_hidden + teacher_weight, "
                         "or teacher_logits")
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias only applies with teacher_hidden + teacher_weight")
        tensor("teacher_logits", teacher_logits, min_dim=1)
        if vocab_size is not None:
            if tuple(teacher_logits.shape[:-1]) != tuple(token_shape):
                raise ValueError(
                    f"teacher_logits token shape {tuple(teacher_logits.shape[:-1])} != "
                    f"student token shape {tuple(token_shape)}")
            vocab_fits(vocab_size, student_weight=vocab,
                       teacher_logits=teacher_logits.shape[-1])
            return
        want = (*token_shape, vocab)
        if tuple(teacher_logits.shape) != want:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} != {want} "
                "(student token shape + student vocabulary; if the vocabularies are "
                "padded differently, pass vocab_size=<the real shared vocabulary>)"
            )
        return
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if tuple(teacher_hidden.shape[:-1]) != tuple(token_shape):
        raise ValueError(
            f"teacher_hidden token shape {tuple(teacher_hidden.shape[:-1])} != student_hidden "
            f"token shape {tuple(token_shape)}"
        )
    if vocab_size is not None:
        vocab_fits(vocab_size, student_weight=vocab, teacher_weight=teacher_weight.shape[0])
    elif teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"teacher_weight vocab {teacher_weight.shape[0]} (shape "
            f"{tuple(teacher_weight.shape)}) != student_weight vocab {vocab} (if the "
            "vocabularies are padded differently, pass vocab_size=<the real shared "
            "vocabulary>)"
        )


def topk_teacher(logprobs: object, ids: object, token_shape, vocab: int) -> int:
    """A served teacher: ``(..., k)`` floating log-probs and ``(..., k)`` integer ids with
    the student's token shape, ``1 <= k <= vocab``. Returns ``k``. (Id values are checked
    inside the op: :func:`eaopd_mp.topk.ids_problem`.)"""
    if logprobs is None or ids is None:
        raise ValueError("teacher_topk_logprobs and teacher_topk_indices must be given "
                         "together")
    tensor("teacher_topk_logprobs", logprobs, min_dim=1)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_topk_indices must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"teacher_topk_indices must hold integer vocabulary ids (int64), "
                         f"got dtype {ids.dtype}")
    if tuple(ids.shape) != tuple(logprobs.shape):
        raise ValueError(f"teacher_topk_indices shape {tuple(ids.shape)} != "
                         f"teacher_topk_logprobs shape {tuple(logprobs.shape)}")
    k = logprobs.shape[-1]
    want = (*token_shape, k)
    if tuple(logprobs.shape) != want:
        raise ValueError(f"teacher_topk_logprobs shape {tuple(logprobs.shape)} != {want} "
                         "(the student's token shape + k)")
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher top-k needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    return k


def entropy(x: object, token_shape) -> None:
    """``teacher_entropy``: a floating ``(...)`` tensor with the token shape, or None."""
    if x is None:
        return
    tensor("teacher_entropy", x)
    if tuple(x.shape) != tuple(token_shape):
        raise ValueError(f"teacher_entropy shape {tuple(x.shape)} != token shape "
                         f"{tuple(token_shape)}")
