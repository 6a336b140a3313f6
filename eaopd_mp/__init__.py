"""Entropy-Aware On-Policy Distillation loss: exact, fused, chunked, compiled and
vocab-parallel.

Per token, with the untempered teacher entropy ``H``: ``L = a KL(teacher||student) +
b KL(student||teacher)``; the reference definition's gate (:mod:`eaopd_mp.reference`) is
``a = clamp(H / h_max, 0, 1)``, ``b = 1 - a``.
"""

from .gates import GATES
from .loss import entropy_aware_opd_loss, fused_linear_eaopd_loss, teacher_entropy
from .modules import EntropyAwareOPDLoss, FusedLinearEAOPDLoss
from .options import LossOptions
from .reference import reference_eaopd_loss

__version__ = "0.1.0"

__all__ = [
    "GATES",
    "EntropyAwareOPDLoss",
    "FusedLinearEAOPDLoss",
    "LossOptions",
    "entropy_aware_opd_loss",
    "fused_linear_eaopd_loss",
    "reference_eaopd_loss",
    "teacher_entropy",
]
