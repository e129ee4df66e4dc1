"""GGUF files for llama.cpp: the packaged base model as it ships, and a peft LoRA adapter exported
to llama.cpp's GGUF LoRA format, so that a fine-tuned model runs on the llama.cpp back end with the
adapter applied at load time rather than merged and re-quantised.

The export follows llama.cpp's own `convert_lora_to_gguf.py`: one `<tensor>.lora_a` / `.lora_b`
pair per adapted weight, `adapter.lora.alpha` in the header. It is cached by the adapter's hash.
"""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path

from aimlqa import settings
from aimlqa.settings import UserError
from rag.embedded import GGUF_PREFIX, cache_root, packaged_gguf

# peft module name -> llama.cpp tensor name, for the decoder layers of the families exported here
_TENSORS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
ARCHITECTURES = {"gemma3": "gemma3"}  # families whose projections need no re-layout in GGUF


def gguf_file(base: str) -> Path:
    """The GGUF file of a registry base: `gguf:<package>` written once from its PyPI package, or a path."""
    if base.startswith(GGUF_PREFIX):
        package = base[len(GGUF_PREFIX) :]
        out = cache_root() / "gguf" / f"{package}.gguf"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out.parent / f".{out.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not out.is_file():
                    tmp = out.parent / f".{package}.tmp"
                    packaged_gguf(package, tmp).rename(out)
        return out
    path = Path(base)
    if path.suffix != ".gguf" or not path.is_file():
        raise UserError(f"the llama.cpp back end needs a GGUF model file; {base!r} is not one "
                        "(use gguf:<package> or a path to a .gguf file in the registry's base)")
    return path


def adapter_gguf(adapter: str | Path, base: str) -> Path:
    """The adapter as a GGUF LoRA file, exported on first use and kept under $AIMLQA_HOME/gguf-lora."""
    from safetensors.torch import load_file

    adapter = Path(adapter)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter}: no adapter_model.safetensors; the llama.cpp back end needs a peft LoRA adapter directory")
    import hashlib

    digest = hashlib.sha256(weights.read_bytes() + base.encode()).hexdigest()[:16]
    out = settings.home() / "gguf-lora" / f"{adapter.parent.name or 'adapter'}-{digest}.gguf"
    if out.is_file():
        return out
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    export_lora({k: v.float().numpy() for k, v in load_file(str(weights)).items()}, config, out)  # bf16 has no numpy type
    return out


def export_lora(tensors: dict, config: dict, out: Path, architecture: str = "gemma3") -> Path:
    """Write peft LoRA tensors as a llama.cpp GGUF adapter (atomically: a temp file, then rename)."""
    import gguf
    import numpy as np

    if config.get("use_dora"):
        raise UserError("a DoRA adapter cannot run on llama.cpp; serve it with the transformers back end")
    if architecture not in ARCHITECTURES.values():
        raise UserError(f"exporting {architecture} adapters to GGUF is not supported; serve it with the transformers back end")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= r**0.5  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in _TENSORS:
            raise UserError(f"adapter tensor {key!r} has no llama.cpp counterpart; serve this adapter with the transformers back end")
        name = f"blk.{m.group(1)}.{_TENSORS[m.group(2)]}.weight"
        pairs.setdefault(name, {})[m.group(3)] = np.asarray(value, dtype=np.float32).astype(np.float16)
    if not pairs or any(set(p) != {"A", "B"} for p in pairs.values()):
        raise UserError("the adapter has no complete lora_A / lora_B pairs to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, pair in sorted(pairs.items()):
        writer.add_tensor(f"{name}.lora_a", pair["A"])
        writer.add_tensor(f"{name}.lora_b", pair["B"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out
