"""Deprecated: the FSDP2 / DeepSpeed adapters live in :mod:`eaopd_mp.engines`, layout
recognition in :mod:`eaopd_mp.layouts` and the DTensor front door in
:mod:`eaopd_mp.dtensor`. Importing this module warns; its names stay until 0.2."""

from __future__ import annotations

import warnings

from .engines import head_eaopd_loss, run_frozen, run_in_forward
from .layouts import is_sharded

warnings.warn("eaopd_mp.sharded is deprecated: use eaopd_mp.engines (head_eaopd_loss, "
              "run_in_forward, run_frozen) and eaopd_mp.layouts (is_sharded)",
              DeprecationWarning, stacklevel=2)

__all__ = ["head_eaopd_loss", "is_sharded", "run_frozen", "run_in_forward"]
