"""Argument errors that stay readable inside ``torch.compile(fullgraph=True)``.

Eagerly, a bad argument raises the ``ValueError``/``TypeError`` the check wrote. Inside a
step compiled with ``fullgraph=True``, dynamo traces the checks and turns any exception
they raise into ``Unsupported: Observed exception``, the message left in the debug context
(with symbolic sizes under ``dynamic=True``). :func:`surfaced` wraps a public entry point
so that, while dynamo traces it, such an error is re-raised at trace time as
``torch._dynamo.exc.TorchRuntimeError("ValueError: <the message, concrete sizes>")`` with the
original error as its ``__cause__``: what PyTorch's own ops give for a bad argument under
``torch.compile`` (``F.cross_entropy``'s shape error, for example). Nothing changes eagerly
or when the arguments are valid.
"""

from __future__ import annotations

import functools

import torch


def surfaced(fn):
    """Decorator: ``fn``'s ``ValueError``/``TypeError`` readable under dynamo (see the
    module docstring); a plain pass-through otherwise."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as exc:  # noqa: F841 - read by _reraise at trace time
            if torch.compiler.is_compiling():
                from torch._dynamo.comptime import comptime

                comptime(_reraise)
            raise

    return entry


def _reraise(ctx) -> None:
    """Run by dynamo at trace time (``comptime``) in :func:`surfaced`'s handler: rebuild
    the traced exception ``exc`` with concrete values and raise it as a
    ``TorchRuntimeError`` (the original as its cause)."""
    from torch._dynamo.exc import TorchRuntimeError

    error = _rebuilt(ctx)
    raise TorchRuntimeError(f"{type(error).__name__}: {error}") from error


def _rebuilt(ctx) -> Exception:
    """The exception dynamo traced, as a real exception object: its type, and its message
    with every symbolic size replaced by its value in this call. Reads dynamo's variable
    trackers (internal API): on any surprise, the type with a generic message."""
    var = ctx.get_local("exc")._i_will_not_complain_if_bc_breaks_VariableTracker()
    kind = getattr(var, "exc_type", None)
    kind = kind if isinstance(kind, type) and issubclass(kind, Exception) else ValueError
    try:
        return kind(*(_value(a) for a in var.args))
    except Exception:  # noqa: BLE001 - dynamo internals changed: say what we can
        return kind("invalid argument (run the step eagerly, without torch.compile, for "
                    "the full message)")


def _value(var):
    """A traced value (constant, symbolic int or float, f-string, tuple/list of them) as a
    plain Python value; a symbolic size becomes this call's concrete size."""
    if hasattr(var, "format_string"):  # an f-string with symbolic parts
        return var.format_string.format(*(_value(a) for a in var.sym_args),
                                        **{k: _value(v) for k, v in var.sym_kwargs.items()})
    if hasattr(var, "sym_num"):
        num = var.sym_num
        if isinstance(num, torch.SymInt):
            return int(num)
        return float(num) if isinstance(num, torch.SymFloat) else num
    if var.is_python_constant():
        return var.as_python_constant()
    return var.python_type()([_value(v) for v in var.items])  # a tuple, list or size
