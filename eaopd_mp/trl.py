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

Several teachers: ``teacher_model={"math": m1, "code": m2}`` and ``teacher_column`` (a
dataset column naming each example's teacher, as verl routes by ``data_source``): each
teacher runs on its own examples and one fused call scores every completion token by its
example's teacher; ``eaopd/<name>/<stat>`` logs each teacher's statistics.

TRL's internals move between releases: the supported range is pinned in the ``[trl]``
extra, and :func:`check_trl` refuses a ``DistillationTrainer`` whose hook no longer has
the signature this class overrides.
"""

from __future__ import annotations

import inspect

import torch

from . import engines, layouts
from .hf import check_same_transforms, gathered_heads, lm_head
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

    Takes ``DistillationTrainer``'s arguments (``teacher_model`` may be a dict of several
    teachers, with ``teacher_column``: see the module docstring) plus ``loss_options``, a
    dict of
    :class:`~eaopd_mp.options.LossOptions` (``gate``, ``h_max``, ``chunk_size``,
    ``vocab_size``, ...), validated at construction. ``temperature`` defaults to the
    config's (TRL uses it for sampling and the loss); ``reduction`` and ``return_stats``
    are the trainer's; the head transforms come from the models' configs.
    """

    def __init__(self, model=None, teacher_model=None, *args, loss_options: dict | None = None,
                 teacher_column: str | None = None, **kwargs):
        check_trl(DistillationTrainer)
        options = dict(loss_options or {})
        bad = sorted(set(options) & {*FIXED_OPTIONS, "student_softcap", "teacher_softcap",
                                     "student_logit_scale", "teacher_logit_scale"})
        if bad:
            raise TypeError(f"loss_options {', '.join(bad)} are set by the trainer or read "
                            "from the models")
        LossOptions.build(options)  # unknown names and bad values raise here, before setup
        names, models = _teacher_table(teacher_model, teacher_column)
        if len(models) > 1:  # from the configs, before any setup
            check_same_transforms(models)
        super().__init__(model, models[0] if models else None, *args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("EAOPDDistillationTrainer needs a local teacher_model: the fused "
                             "loss reads the teacher's hidden states and output layer")
        # Several teachers: the first is TRL's own; the others are prepared as TRL
        # prepares it (evaluation mode, DeepSpeed or not).
        self.teacher_names, self.teacher_column = names, teacher_column
        self.teacher_models = [self.teacher_model] + [self._prepare_teacher(m)
                                                      for m in models[1:]]
        options.setdefault("temperature", self.args.temperature)
        self.loss_options = LossOptions.build(dict(options, reduction="sum", return_stats=True))
        self._eaopd_stats: dict | None = None

    def _prepare_teacher(self, model):
        if self.is_deepspeed_enabled:
            from trl.trainer.utils import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        """Keep the teacher column through TRL's column filter."""
        super()._set_signature_columns_if_needed()
        if self.teacher_column and self.teacher_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.teacher_column]

    def _generate_and_score_completions(self, inputs):
        """TRL's generation batch, plus ``teacher_index`` ``(B,)`` from the teacher column
        (TRL shuffles and splits it with the other per-example tensors)."""
        out = super()._generate_and_score_completions(inputs)
        if self.teacher_column is not None:
            out["teacher_index"] = torch.tensor(
                [self._teacher_number(x.get(self.teacher_column)) for x in inputs],
                device=self.accelerator.device)
        return out

    def _teacher_number(self, name) -> int:
        if name not in self.teacher_names:
            raise ValueError(f"{self.teacher_column}={name!r} names no teacher; the teachers "
                             f"are {self.teacher_names}")
        return self.teacher_names.index(name)

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
        index = inputs.get("teacher_index")
        if index is not None:  # from the configs, before any model (and collective) runs
            check_same_transforms([self.accelerator.unwrap_model(t)
                                   for t in self.teacher_models])
        # TRL's backbone call: (B, C, H) hidden states of the positions predicting the
        # completion tokens; the teacher's through its own wrapper, without gradient.
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep,
                                             **extra)
        if index is not None:  # several teachers
            loss, stats = self._routed_loss(unwrapped_student, hidden, input_ids,
                                            attention_mask, keep, loss_mask, index, extra)
        else:
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)

            def teacher_part():
                # Inside the teacher wrapper's forward (frozen): FSDP2 / ZeRO-3 gather its
                # head there, and keep it gathered for the fused loss, which needs both.
                with torch.no_grad():
                    t_hidden = self._get_last_hidden_state(unwrapped_teacher, input_ids,
                                                           attention_mask, keep, **extra)
                heads = [m.get_output_embeddings()
                         for m in (unwrapped_student, unwrapped_teacher)]
                with engines.gathered(*(getattr(h, n, None) for h in heads
                                        for n in ("weight", "bias"))):
                    return self._fused_loss(hidden, [t_hidden], lm_head(unwrapped_student),
                                            [lm_head(unwrapped_teacher)], loss_mask)

            loss, stats = engines.run_frozen(self.teacher_model, teacher_part)
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

    def _routed_loss(self, unwrapped_student, hidden, input_ids, attention_mask, keep,
                     loss_mask, index, extra):
        """Several teachers: each runs on its own examples (``index`` ``(B,)``), then one
        fused call over every completion token, inside every teacher wrapper's forward
        (nested, teacher 0 outermost: FSDP2 / ZeRO-3 gather every head there). Every rank
        enters every teacher in the same order; a rank with no example for a sharded teacher
        (:func:`eaopd_mp.layouts.is_sharded`: any FSDP2 unit, DTensor or ZeRO-3 parameter
        in it) runs it on its first example and drops the result, so that the engine's collectives
        match across ranks (see :func:`eaopd_mp.engines.run_teachers_frozen`)."""
        if extra:
            raise ValueError("several teachers with multimodal inputs are not supported")
        unwrapped = [self.accelerator.unwrap_model(t) for t in self.teacher_models]
        t_hidden = []

        def step(j):
            teacher = self.teacher_models[j]
            rows = (index == j).nonzero().squeeze(1)
            engine = layouts.is_sharded(teacher)  # collectives in its forward (any layer)

            def forward(take):
                return self._get_last_hidden_state(unwrapped[j], input_ids[take],
                                                   attention_mask[take], keep)

            def empty():
                w = lm_head(unwrapped[j]).weight
                return w.new_zeros(0, keep, w.shape[1])

            def run():  # inside teacher j's wrapper forward (frozen)
                t_hidden.append(engines.routed_hidden(rows, engine, forward, empty))
            return run

        def loss():  # every head gathered
            with gathered_heads(unwrapped_student, *unwrapped):
                return self._fused_loss(hidden, t_hidden, lm_head(unwrapped_student),
                                        [lm_head(m) for m in unwrapped], loss_mask, index)

        for teacher in self.teacher_models:
            teacher.eval()
        return engines.run_teachers_frozen([[t] for t in self.teacher_models],
                                           [step(j) for j in range(len(unwrapped))], loss)

    def _fused_loss(self, hidden, t_hidden, s_head, t_heads, loss_mask, index=None):
        """Summed loss and statistics of the ``(B, C)`` masked completion positions; with
        several teachers ``index`` ``(B,)`` routes each example to its teacher."""
        device = s_head.weight.device
        opts = self.loss_options
        vocab = opts.vocab_size or min(s_head.vocab_size, *(t.vocab_size for t in t_heads))
        # Several teachers share one head transform: checked from their configs before
        # any model ran (_compute_loss, hf.check_same_transforms).
        teacher = dict(teacher_hidden=[h.to(device) for h in t_hidden],
                       teacher_weight=[t.weight for t in t_heads],
                       teacher_bias=[t.bias for t in t_heads],
                       teacher_index=None if index is None else
                       index.to(device)[:, None].expand(loss_mask.shape))
        if index is None:  # one teacher: plain tensors
            teacher = {k: v[0] for k, v in teacher.items() if k != "teacher_index"}
        return fused_linear_eaopd_loss(
            hidden.to(device), s_head.weight, student_bias=s_head.bias,
            labels=loss_mask.to(device), **teacher,
            **dict(opts.given(), vocab_size=vocab), **s_head.options("student"),
            **t_heads[0].options("teacher"))

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
        for name, mine in zip(self.teacher_names, stats.get("per_teacher", ()), strict=False):
            tokens = gather(mine["tokens"].detach().float().reshape(1)).sum()
            for key in STATS:
                weighted = gather((mine[key].detach().float() * mine["tokens"]).reshape(1)).sum()
                value = (weighted / tokens).item() if tokens > 0 else float("nan")
                self._metrics[mode][f"eaopd/{name}/{key}"].append(value)


def _teacher_table(teacher_model, teacher_column: str | None) -> tuple[list, list]:
    """``(names, models)``: one teacher as TRL takes it, or ``{name: model}`` with the
    dataset column that names each example's teacher."""
    if not isinstance(teacher_model, dict):
        if teacher_column is not None:
            raise ValueError("teacher_column routes examples to several teachers: pass "
                             "teacher_model={name: model, ...}")
        return [], [] if teacher_model is None else [teacher_model]
    if teacher_column is None:
        raise ValueError("several teachers (teacher_model={name: model}) need teacher_column, "
                         "the dataset column that names each example's teacher")
    if not teacher_model:
        raise ValueError("teacher_model={} holds no teacher")
    if any(isinstance(m, str) for m in teacher_model.values()):
        raise TypeError("several teachers must be loaded models (not names to load)")
    return list(teacher_model), list(teacher_model.values())
