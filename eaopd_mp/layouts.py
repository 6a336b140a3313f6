"""Recognise how a tensor or a model is laid out across processes, without importing the
engines: DTensor (tensor parallelism, FSDP2's parameters), FSDP2 (``fully_shard``), FSDP1,
DeepSpeed ZeRO-3 and its engine.

Every check here only looks: a framework is consulted only when the caller's process has
imported it already (``sys.modules``), so that ``import eaopd_mp`` and a call on plain
tensors never import ``torch.distributed``'s sharding stacks or DeepSpeed. The argument
checks (:mod:`eaopd_mp.inputs`), the DTensor front door (:mod:`eaopd_mp.dtensor`) and the
engine adapters (:mod:`eaopd_mp.engines`) build on it.
"""

from __future__ import annotations

import sys


def dtensor_type():
    """``torch.distributed.tensor.DTensor`` if that module was imported (else no DTensor
    can exist, and nothing is imported here)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def any_dtensor(*xs) -> bool:
    """Whether any of ``xs`` is a DTensor, or a list of teachers' tensors holding one
    (cheap: no import)."""
    cls = dtensor_type()
    return cls is not None and any(
        isinstance(x, cls) or (isinstance(x, (list, tuple)) and any_dtensor(*x)) for x in xs)


def is_fsdp2(module) -> bool:
    """Whether ``module`` was wrapped by FSDP2's ``fully_shard``."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_fsdp1(module) -> bool:
    """Whether ``module`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def is_flat_param(p) -> bool:
    """Whether ``p`` is an FSDP1 ``FlatParameter`` (a flattened shard of many parameters)."""
    return bool(getattr(p, "_is_flat_param", False))


def is_zero3_param(p) -> bool:
    """Whether ``p`` is a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_id``)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def zero3_enabled(*modules) -> bool:
    """Whether any parameter of ``modules`` is partitioned by DeepSpeed ZeRO-3."""
    return any(is_zero3_param(p) for m in modules if m is not None
               for p in m.parameters(recurse=True))


def is_engine(module) -> bool:
    """A DeepSpeed engine (its ``module`` attribute holds the model)."""
    return type(module).__name__ == "DeepSpeedEngine"


def is_sharded(model) -> bool:
    """Whether running ``model`` issues collectives that every rank must join: it is a
    DeepSpeed engine, any of its submodules is an FSDP2 unit (``fully_shard`` on its decoder
    layers only, the root left plain, counts), or any parameter is a DTensor (FSDP2, tensor
    parallelism) or ZeRO-3 partitioned. Such a teacher is run on every rank, also where this
    rank routes it no sequence (see :func:`eaopd_mp.engines.run_teachers_frozen`)."""
    if model is None:
        return False
    if is_engine(model) or any(is_fsdp2(m) for m in model.modules()):
        return True
    cls = dtensor_type()
    return any((cls is not None and isinstance(p, cls)) or is_zero3_param(p)
               for p in model.parameters(recurse=True))
