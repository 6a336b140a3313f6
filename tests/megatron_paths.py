"""Which path :mod:`eaopd_mp.megatron` must take on the installed megatron-core, and a spy
that shows which one it took."""

from __future__ import annotations

from importlib import metadata

# GPTModel.forward's output_processor hook (megatron-core PR #4686) is in 0.19, not in 0.16:
# the path the helpers must take here (None: a release in between, not checked).
MEGATRON_VERSION = metadata.version("megatron-core")
_MINOR = tuple(int(x) for x in MEGATRON_VERSION.split(".")[:2])
EXPECT_HOOK = True if _MINOR >= (0, 19) else False if _MINOR <= (0, 16) else None


def spy_postprocess(model) -> list:
    """Record the ``output_processor`` keyword of every call of ``model._postprocess`` (the
    last step of ``GPTModel.forward``; the private fallback path never calls it)."""
    calls, real = [], model._postprocess

    def spy(*args, **kwargs):
        calls.append(kwargs.get("output_processor"))
        return real(*args, **kwargs)
    model._postprocess = spy
    return calls
