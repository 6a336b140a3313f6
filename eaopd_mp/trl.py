"""TRL: on-policy distillation with TRL's ``DistillationTrainer`` and this library's loss.

:class:`EAOPDDistillationTrainer` subclasses ``trl.DistillationTrainer`` (TRL 1.16) and
replaces only its loss hook, ``_compute_loss``: TRL still generates the completions, builds
the prompt/completion masks (tool masks included), counts ``num_items_in_batch`` for
gradient accumulation, wraps the models for DDP/FSDP and logs. The loss is the fused
entropy-aware OPD loss over the completion tokens (head transforms and vocabulary sizes
read by :func:`eaopd_mp.hf.lm_head`), summed and divided by ``num_items_in_batch`` as
TRL's own divergence is; the gate statistics are logged as ``eaopd/teacher_entropy``,
``eaopd/fkl_weight``, ``eaopd/rkl_weight``, ``eaopd/kl_fwd``, ``eaopd/kl_rev`` (token
means over the logging window and the processes). TRL's ``beta`` does not apply (the gate
mixes the KLs); its ``entropy`` metric (the student's entropy) is not computed by this
loss and is logged as None.

TRL's internals move between releases: the supported range is pinned in the ``[trl]``
extra, and :func:`check_trl` refuses a ``DistillationTrainer`` whose hook no longer has
the signature this class overrides.
"""

from __future__ import annotations

import inspect

import torch

from . import sharded
from .hf import lm_head
from .loss import fused_linear_eaopd_loss
from .options import LossOptions

try:
    from trl import DistillationTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("eaopd_mp.trl needs TRL: pip install 'eaopd-mp[trl]'") from exc

SUPPORTED_TRL = ">=1.16,<1.17"
# The overridden hook: TRL calls it inside compute_loss and expects (loss, entropy_sum,
# n_valid) back.
HOOK_PARAMETERS = ("self", "unwrapped_student", "inputs", "num_items_in_batch")
# Options the trainer sets itself.
FIXED_OPTIONS = ("reduction", "return_stats")
STATS = ("teacher_entropy", "fkl_weight", "rkl_weight", "kl_fwd", "kl_rev")
# Multimodal fields TRL's _compute_loss forwards to the backbone.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check_trl(cls=DistillationTrainer) -> None:
    """Raise ``TypeError`` unless ``cls._compute_loss`` has the signature overridden here."""
    hook = getattr(cls, "_compute_loss", None)
    params = tuple(inspect.signature(hook).parameters) if hook is not None else None
    if params != HOOK_PARAMETERS:
        import trl

        raise TypeError(
            f"trl {trl.__version__}: DistillationTrainer._compute_loss{params} is not the hook "
            f"{HOOK_PARAMETERS} EAOPDDistillationTrainer overrides; supported TRL: "
            f"{SUPPORTED_TRL}")


class EAOPDDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is the entropy-aware OPD loss.

    Takes ``DistillationTrainer``'s arguments plus ``loss_options``, a dict of
    :class:`~eaopd_mp.options.LossOptions` (``gate``, ``h_max``, ``chunk_size``,
    ``vocab_size``, ...), validated at construction. ``temperature`` defaults to the
    config's (TRL uses it for sampling and the loss); ``reduction`` and ``return_stats``
    are the trainer's; the head transforms come from the models' configs.
    """

    def __init__(self, *args, loss_options: dict | None = None, **kwargs):
        check_trl(DistillationTrainer)
        options = dict(loss_options or {})
        bad = sorted(set(options) & {*FIXED_OPTIONS, "student_softcap", "teacher_softcap",
                                     "student_logit_scale", "teacher_logit_scale"})
        if bad:
            raise TypeError(f"loss_options {', '.join(bad)} are set by the trainer or read "
                            "from the models")
        LossOptions.build(options)  # unknown names and bad values raise here, before setup
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("EAOPDDistillationTrainer needs a local teacher_model: the fused "
                             "loss reads the teacher's hidden states and output layer")
        options.setdefault("temperature", self.args.temperature)
        self.loss_options = LossOptions.build(dict(options, reduction="sum", return_stats=True))
        self._eaopd_stats: dict | None = None

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The loss of one micro-batch: ``(loss, entropy_sum, n_valid)`` as TRL's hook.

        ``inputs`` holds TRL's ``prompt_ids``/``prompt_mask`` ``(B, P)`` and
        ``completion_ids``/``completion_mask`` ``(B, C)`` (and ``tool_mask``).
        """
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        extra = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        # TRL's backbone call: (B, C, H) hidden states of the positions predicting the
        # completion tokens; the teacher's through its own wrapper, without gradient.
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep,
                                             **extra)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)

        def teacher_part():
            # Inside the teacher wrapper's forward (frozen): FSDP2 / ZeRO-3 gather its
            # head there, and keep it gathered for the fused loss, which needs both heads.
            with torch.no_grad():
                t_hidden = self._get_last_hidden_state(unwrapped_teacher, input_ids,
                                                       attention_mask, keep, **extra)
            heads = [m.get_output_embeddings() for m in (unwrapped_student, unwrapped_teacher)]
            with sharded.gathered(*(getattr(h, n, None) for h in heads
                                    for n in ("weight", "bias"))):
                return self._fused_loss(hidden, t_hidden, lm_head(unwrapped_student),
                                        lm_head(unwrapped_teacher), loss_mask)

        loss, stats = sharded.run_frozen(self.teacher_model, teacher_part)
        n_valid = (loss_mask != 0).sum()
        if num_items_in_batch is None:
            loss = loss / n_valid.clamp(min=1)
        else:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        self._eaopd_stats = stats
        # TRL logs entropy_sum / n_valid as the student's entropy: not computed here (NaN,
        # which TRL's log() drops, leaving None).
        nan = torch.full((), float("nan"), device=loss.device)
        return loss, nan, n_valid

    def _fused_loss(self, hidden, t_hidden, s_head, t_head, loss_mask):
        """Summed loss and statistics of the ``(B, C)`` masked completion positions."""
        device = s_head.weight.device
        opts = self.loss_options
        vocab = opts.vocab_size or min(s_head.vocab_size, t_head.vocab_size)
        return fused_linear_eaopd_loss(
            hidden.to(device), s_head.weight, student_bias=s_head.bias,
            teacher_hidden=t_hidden.to(device), teacher_weight=t_head.weight,
            teacher_bias=t_head.bias, labels=loss_mask.to(device),
            **dict(opts.given(), vocab_size=vocab), **s_head.options("student"),
            **t_head.options("teacher"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's ``compute_loss``, then the gate statistics into the logged metrics (outside
        the wrapped forward, as TRL gathers its own metrics)."""
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        stats, self._eaopd_stats = self._eaopd_stats, None
        if stats is not None:
            self._log_stats(stats)
        return out

    def _log_stats(self, stats: dict) -> None:
        """Token-weighted means of the statistics over the processes."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        tokens = stats["tokens"].detach().float()
        total = gather(tokens.reshape(1)).sum()
        for key in STATS:
            weighted = gather((stats[key].detach().float() * tokens).reshape(1)).sum()
            value = (weighted / total).item() if total > 0 else float("nan")
            self._metrics[mode][f"eaopd/{key}"].append(value)
