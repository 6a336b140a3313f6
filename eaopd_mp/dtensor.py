"""The DTensor front door: tensor parallelism as ``torch.distributed.tensor`` lays it out.

DTensor inputs of :func:`eaopd_mp.fused_linear_eaopd_loss` and
:func:`eaopd_mp.entropy_aware_opd_loss` (lm-head weights ``Shard(0)`` over the vocabulary,
logits ``Shard(-1)``; torchtitan's ``ColwiseParallel`` output layer) come here from
:mod:`eaopd_mp.loss`: their layouts are checked (on every rank, so that every rank raises
the same error), they are turned into this rank's local shards, and the vocab-parallel
path (:mod:`eaopd_mp.parallel`) runs over the mesh dimension's process group. Layouts that
cannot be computed exactly raise ``TypeError``/``ValueError`` naming the layout.
``torch.distributed.tensor`` is only imported here once a DTensor was seen.
"""

from __future__ import annotations

import torch

from .layouts import any_dtensor
from .options import LossOptions
from .parallel import linear_parallel, logits_parallel


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Partial, Replicate, Shard


def _layout(x) -> str:
    return f"DTensor on mesh {tuple(x.device_mesh.shape)} with placements {tuple(x.placements)}"


def tp_dim(weight, name: str) -> int:
    """The mesh dim a ``(V, H)`` DTensor weight is sharded over the vocabulary on (exactly one
    ``Shard(0)``, the other dims ``Replicate()``)."""
    Partial, Replicate, Shard = _placements()
    dims = []
    for i, p in enumerate(weight.placements):
        if isinstance(p, Shard) and p.dim == 0:
            dims.append(i)
        elif not isinstance(p, Replicate):
            raise TypeError(
                f"{name} is a {_layout(weight)}: {p!r} is not supported. The supported layout "
                "is Shard(0) over the vocabulary (torchtitan's ColwiseParallel output layer) "
                "on one mesh dim, Replicate() on the others")
    if len(dims) != 1:
        raise TypeError(
            f"{name} is a {_layout(weight)}; the supported layout is Shard(0) over the "
            "vocabulary on exactly one mesh dim (Replicate() on the others)")
    return dims[0]


def _stride(global_rows: int, mesh_size: int) -> int:
    """``torch.chunk``'s shard width: every shard but the last ones holds this many rows."""
    return -(-global_rows // mesh_size)


def _local(name: str, x, mesh, dim: int, ok_dims=(), what: str = ""):
    """``x``'s local tensor (autograd kept) and the tensor dim it is sharded on (or None).

    A plain tensor is taken as the same on every rank (replicated). A DTensor must live on
    ``mesh``, ``Replicate()`` on every mesh dim but the TP dim ``dim``, where it may also be
    ``Shard(k)`` for ``k`` in ``ok_dims`` (``what`` names that layout in errors).
    """
    if x is None or not any_dtensor(x):
        return x, None
    Partial, Replicate, Shard = _placements()
    if x.device_mesh != mesh:
        raise ValueError(f"{name} is a {_layout(x)} but the student's sharded input is on mesh "
                         f"{tuple(mesh.shape)}: give every DTensor input the same mesh")
    sharded = None
    for i, p in enumerate(x.placements):
        if isinstance(p, Replicate):
            continue
        if i == dim and isinstance(p, Shard) and p.dim % x.dim() in ok_dims:
            sharded = p.dim % x.dim()
            continue
        supported = "Replicate()" + (f" or {what}" if what else "")
        raise TypeError(
            f"{name} is a {_layout(x)}: {p!r} on mesh dim {i} is not supported; supported: "
            f"{supported} on the TP mesh dim {dim}, Replicate() on the others (no sharding "
            "along the hidden dim, no Partial)")
    return x.to_local(), sharded


def _each(name: str, x, fn):
    """``fn(name, x)`` on one tensor, or on each entry of a teacher list (named
    ``name[j]``); None (and a list's None entries) stay None."""
    if isinstance(x, (list, tuple)):
        return [None if v is None else fn(f"{name}[{j}]", v) for j, v in enumerate(x)]
    return None if x is None else fn(name, x)


def _entries(name: str, x) -> list:
    """``[(name, tensor), ...]``: one tensor, or a teacher list's given entries."""
    if isinstance(x, (list, tuple)):
        return [(f"{name}[{j}]", v) for j, v in enumerate(x) if v is not None]
    return [] if x is None else [(name, x)]


def _check_teacher_weight(name: str, tw, student_weight, dim: int, mesh) -> None:
    """A teacher head beside a DTensor student head: a DTensor ``Shard(0)`` on the same
    mesh dim with the student's row count (so that every rank's shard has the student's
    width: checked here, on every rank, rather than on the one rank whose shard differs)."""
    if not any_dtensor(tw):
        raise TypeError(f"{name} is a plain tensor but student_weight a DTensor: give every "
                        "head as a DTensor Shard(0) over the vocabulary")
    t_dim = tp_dim(tw, name)
    if t_dim != dim or tw.device_mesh != mesh:
        raise ValueError(f"{name} is a {_layout(tw)}, student_weight a "
                         f"{_layout(student_weight)}: shard both on the same mesh dim")
    if tw.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"{name} has {tw.shape[0]} rows and student_weight {student_weight.shape[0]}: "
            f"sharded over {mesh.size(dim)} ranks their shards differ in width; pad the "
            "heads to one row count (vocab_size= gives the real vocabulary)")


def _check_vocab_widths(vocab: int, student_bias, teacher_bias, teacher_logits) -> None:
    """Biases and dense teacher logits beside a DTensor head of ``vocab`` rows: DTensors
    whose *global* vocabulary width is ``vocab``, checked on every rank (with uneven shards a
    wrong width changes one rank's shard only, so the local shapes would fail on that rank
    alone while the others wait in the next collective)."""
    for name, x, what in (
            *((n, x, "Shard(0)") for n, x in _entries("student_bias", student_bias)),
            *((n, x, "Shard(0)") for n, x in _entries("teacher_bias", teacher_bias)),
            *((n, x, "Shard(-1)") for n, x in _entries("teacher_logits", teacher_logits))):
        if not any_dtensor(x):
            raise TypeError(f"{name} is a plain tensor of shape {tuple(x.shape)} but "
                            f"student_weight a DTensor: give it as a DTensor {what} over the "
                            "vocabulary")
        if x.dim() == 0 or x.shape[-1] != vocab:
            raise ValueError(f"{name} has global shape {tuple(x.shape)} but student_weight "
                             f"has {vocab} rows: its vocabulary dim must be {vocab} wide "
                             f"(sharded {what} like the heads)")


# Where each teacher argument may be sharded (mesh dim of the student's weight):
_SEQ = "Shard(d) on a token dim d (sequence parallelism)"
_ROWS = "Shard(0) over the vocabulary"
_COLS = "Shard(-1) over the vocabulary"


def _layouts(x, name: str):
    """``(ok_dims, what)`` of a teacher argument (:data:`eaopd_mp.inputs.ARGS`)."""
    if name == "teacher_hidden":
        return range(x.dim() - 1), _SEQ
    if name in ("teacher_weight", "teacher_bias"):
        return (0,), _ROWS
    if name == "teacher_logits":
        return (x.dim() - 1,), _COLS
    return (), ""  # served top-k, entropy: replicated


def linear_loss(student_hidden, student_weight, student_bias, teacher: dict, labels,
                teacher_index, options: LossOptions):
    """:func:`eaopd_mp.fused_linear_eaopd_loss` on DTensor inputs: the vocab-parallel fused
    loss over the process group of the mesh dim the student weight is ``Shard(0)`` on.

    Layouts: ``student_weight``/``teacher_weight`` (and biases) ``Shard(0)`` over the
    vocabulary (uneven last shards as ``torch.chunk`` lays them out); hidden states
    ``Replicate()`` (or plain tensors, the same on every rank) or sharded along one token
    dim (sequence parallelism; that dim must divide evenly); ``teacher_logits``
    ``Shard(-1)``; the mask, entropy and top-k tensors replicated. Returns a plain tensor, the
    same on every rank (the replicated loss's local value); gradients reach the DTensors with
    their placements (the weight's ``Shard(0)``, the hidden state's, summed over the mesh).

    Several teachers (``teacher_index``, replicated): each teacher argument is a list (see
    :mod:`eaopd_mp.inputs`) whose entries take the layouts above; every dense teacher's
    head is sharded on the student's mesh dim with the student's row count, and every
    hidden state is sharded alike.
    """
    if not any_dtensor(student_weight):
        raise TypeError(
            f"student_weight is a plain tensor of shape {tuple(student_weight.shape)} but "
            "other inputs are DTensors: give the lm-head weight as a DTensor Shard(0) over "
            "the vocabulary (or all inputs as plain tensors)")
    dim = tp_dim(student_weight, "student_weight")
    mesh = student_weight.device_mesh
    group = mesh.get_group(dim)
    size = mesh.size(dim)
    vocab = student_weight.shape[0]
    for name, tw in _entries("teacher_weight", teacher.get("teacher_weight")):
        _check_teacher_weight(name, tw, student_weight, dim, mesh)
    _check_vocab_widths(vocab, student_bias, teacher.get("teacher_bias"),
                        teacher.get("teacher_logits"))
    h, h_dim = _local("student_hidden", student_hidden, mesh, dim,
                      range(student_hidden.dim() - 1), _SEQ)
    w, _ = _local("student_weight", student_weight, mesh, dim, (0,), _ROWS)
    b, _ = _local("student_bias", student_bias, mesh, dim, (0,), _ROWS)
    local = {k: _each(k, x, lambda n, x, k=k: _local(n, x, mesh, dim, *_layouts(x, k))[0])
             for k, x in teacher.items()}
    mask = _local("labels", labels, mesh, dim)[0]
    index = _local("teacher_index", teacher_index, mesh, dim)[0]
    t_hidden = teacher.get("teacher_hidden")
    for name, x in (("student_hidden", student_hidden), *_entries("teacher_hidden", t_hidden)):
        if not any_dtensor(x):
            _check_replicated(name, x, group)
    for name, x in _entries("teacher_hidden", t_hidden):
        x_dim = _local(name, x, mesh, dim, range(x.dim() - 1), _SEQ)[1]
        if x_dim != h_dim:
            raise ValueError(f"student_hidden ({_describe(student_hidden)}) and {name} "
                             f"({_describe(x)}) must be sharded alike")
        if x_dim is not None and x.shape[x_dim] % size:
            raise ValueError(f"{name} is a {_layout(x)}: its token dim {x_dim} of size "
                             f"{x.shape[x_dim]} does not split evenly over {size} ranks; "
                             "sequence parallelism needs equal shards")
    options = _with_vocab(options, vocab)
    stride = _stride(vocab, size)
    if h_dim is None:
        return linear_parallel(h, w, b, local, mask, index, options, group, False, stride)
    return _sequence_parallel(student_hidden, h_dim, size, h, w, b, local, mask, index,
                              options, group, stride)


def _check_replicated(name: str, x: torch.Tensor, group) -> None:
    """A plain tensor beside a DTensor weight is taken as replicated over the weight's mesh
    dim: check it (one tiny all-gather of a float64 fingerprint), so that an FSDP2-sharded
    weight read outside its module's forward (a DTensor ``Shard(0)`` over the data-parallel
    mesh, whose ranks hold different tokens) raises instead of mixing tokens."""
    import torch.distributed as dist

    v = x.detach().to(torch.float64)
    mine = torch.stack([v.sum(), (v * v).sum()]).to(x.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    if any(not torch.equal(t, table[0]) for t in table):
        raise ValueError(
            f"{name} is a plain tensor of shape {tuple(x.shape)} that differs across the "
            "ranks the weight is sharded over; a plain hidden state must be the same on "
            "every rank (or give it as a DTensor). If the weight is an FSDP2 parameter read "
            "outside its module's forward, run the loss inside it: "
            "eaopd_mp.engines.head_eaopd_loss(head, hidden, model=root, ...)")


def _describe(x) -> str:
    return _layout(x) if any_dtensor(x) else f"plain tensor of shape {tuple(x.shape)}"


def _with_vocab(options: LossOptions, vocab: int) -> LossOptions:
    """The real vocabulary defaults to the weight's global rows (not stride x ranks)."""
    if options.vocab_size is not None:
        return options
    return LossOptions.build(dict(options.given(), vocab_size=vocab))


def _sequence_parallel(student_hidden, d, size, h, w, b, teacher: dict, mask, index,
                       options, group, stride):
    """Hidden states sharded along token dim ``d``: the vocab-parallel path gathers and
    reduce-scatters along the first dim, so ``d`` is moved first (and every token-shaped
    tensor with it: a routed teacher's own tokens too, which keeps them in token order when
    the routing is along another dim); ``batchmean`` keeps dividing by the caller's first
    token dim. ``teacher``, ``mask``, ``index``: local tensors."""
    full = student_hidden.shape[d]
    if full % size:
        raise ValueError(
            f"student_hidden is a {_layout(student_hidden)}: its token dim {d} of size {full} "
            f"does not split evenly over {size} ranks; sequence parallelism needs equal "
            "shards (pad the sequence)")
    token_shape = tuple(student_hidden.shape[:-1])
    if d:
        n_tok = len(token_shape)

        def first(n, x, extra=1):
            if x.dim() != n_tok + extra:  # a routed teacher's flat rows cannot be moved
                raise ValueError(
                    f"{n} has shape {tuple(x.shape)}: under sequence parallelism (token dim "
                    f"{d} sharded) give it {n_tok + extra} dims, its own tokens laid out like "
                    f"the student's {token_shape} (one teacher per sequence: its sequences)")
            return x.movedim(d, 0)

        def token(n, x):  # token-shaped (no feature dim)
            return first(n, x, 0)

        h = h.movedim(d, 0)
        teacher = {k: x if k in ("teacher_weight", "teacher_bias") else
                   _each(k, x, token if k == "teacher_entropy" else first)
                   for k, x in teacher.items()}
        mask, index = _each("labels", mask, token), _each("teacher_index", index, token)
    reduction = options.reduction
    if d and reduction == "batchmean":
        options = LossOptions.build(dict(options.given(), reduction="sum"))
    out = linear_parallel(h, w, b, teacher, mask, index, options, group, True, stride)
    loss, stats = out if options.return_stats else (out, None)
    if d and reduction == "batchmean":
        loss = loss / max(token_shape[0], 1)
    elif d and reduction == "none":
        loss = loss.movedim(0, d)
    if d and stats is not None and "token" in stats:  # per-token statistics: the same move
        stats["token"] = {k: v.movedim(0, d) for k, v in stats["token"].items()}
    return loss if stats is None else (loss, stats)


def logits_loss(student_logits, teacher: dict, labels, teacher_index, options: LossOptions):
    """:func:`eaopd_mp.entropy_aware_opd_loss` on vocabulary-sharded DTensor logits
    (``Shard(-1)`` on one mesh dim, uneven last shards as ``torch.chunk`` lays them out):
    the vocab-parallel loss over that dim's process group. Token dims must not be sharded;
    the mask, entropy and top-k tensors (and ``teacher_index``) are replicated. Several
    teachers: lists as :mod:`eaopd_mp.inputs` says, each dense teacher's logits sharded
    like the student's. Returns a plain tensor, the same on every rank."""
    Partial, Replicate, Shard = _placements()
    if not any_dtensor(student_logits):
        raise TypeError("student_logits is a plain tensor but other inputs are DTensors: give "
                        "the logits as a DTensor Shard(-1) over the vocabulary")
    last = student_logits.dim() - 1
    dims = [i for i, p in enumerate(student_logits.placements)
            if isinstance(p, Shard) and p.dim % student_logits.dim() == last]
    if len(dims) != 1:
        raise TypeError(f"student_logits is a {_layout(student_logits)}; the supported layout "
                        "is Shard(-1) over the vocabulary on one mesh dim, Replicate() on "
                        "the others")
    dim, mesh = dims[0], student_logits.device_mesh
    size = mesh.size(dim)
    vocab = student_logits.shape[-1]
    z, _ = _local("student_logits", student_logits, mesh, dim, (last,), _COLS)
    teacher_logits = teacher.get("teacher_logits")
    for name, y in _entries("teacher_logits", teacher_logits):
        if not any_dtensor(y):
            raise TypeError(f"{name} is a plain tensor but student_logits a DTensor: give "
                            "both as DTensors Shard(-1) over the vocabulary")
        routed = isinstance(teacher_logits, (list, tuple))
        if (y.shape[-1] != vocab) if routed else (y.shape != student_logits.shape):
            raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != "
                             f"{name} shape {tuple(y.shape)}")
    local = {k: _each(k, x, lambda n, x, k=k: _local(n, x, mesh, dim, *_layouts(x, k))[0])
             for k, x in teacher.items()}
    return logits_parallel(z, local, _local("labels", labels, mesh, dim)[0],
                           _local("teacher_index", teacher_index, mesh, dim)[0],
                           _with_vocab(options, vocab), mesh.get_group(dim),
                           _stride(vocab, size))
