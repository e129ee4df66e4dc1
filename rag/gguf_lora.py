"""GGUF files for llama.cpp: the packaged base model as it ships, and a peft LoRA adapter exported
to llama.cpp's GGUF LoRA format, so that a fine-tuned model runs on the llama.cpp back end with the
adapter applied at load time rather than merged and re-quantised.

The export follows llama.cpp's own `convert_lora_to_gguf.py`: one `<tensor>.lora_a` / `.lora_b`
pair per adapted weight, `adapter.lora.alpha` in the header. It is cached by the adapter's hash, and
recorded in a shipped adapter's manifest (`exports.llamacpp`: format, tensors, alpha, and a digest of
the exported tensors that every later export is checked against):

    python -m rag.gguf_lora rag/adapters/NAME     # export, and record it in NAME/manifest.json
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from aimlqa import settings
from aimlqa.settings import UserError
from aimlqa.files import built_once, write_json
from rag.embedded import GGUF_PREFIX, cache_root, packaged_gguf

# peft module name -> llama.cpp tensor name, for the decoder layers of the families exported here
_TENSORS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
ARCHITECTURES = {"gemma3": "gemma3"}  # registry family -> GGUF architecture, for those whose projections need no re-layout
ALTERNATIVE = "use a transformers model instead (e.g. -m gemma-270m-aiml)"


def require_llamacpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("the llama.cpp back end needs llama-cpp-python (`make install` builds it, "
                        f"or `pip install -e '.[llamacpp]'`); {ALTERNATIVE}") from None
    return llama_cpp


def gguf_file(base: str) -> Path:
    """The GGUF file of a registry base: `gguf:<package>` written once from its PyPI package, or a path."""
    if base.startswith(GGUF_PREFIX):
        package = base[len(GGUF_PREFIX) :]
        return built_once(cache_root() / "gguf" / f"{package}.gguf", lambda work: packaged_gguf(package, work))
    path = Path(base)
    if path.suffix != ".gguf" or not path.is_file():
        raise UserError(f"the llama.cpp back end needs a GGUF model file; {base!r} is not one "
                        "(use gguf:<package> or a path to a .gguf file in the registry's base)")
    return path


def model_file(spec) -> Path:
    """The GGUF file llama.cpp serves for a registry entry: its base, re-quantised if it asks."""
    path = gguf_file(spec.base)
    return requantized(path, spec.quantize) if spec.quantize else path


def adapter_gguf(adapter: str | Path, base: str, family: str = "gemma3") -> Path:
    """The adapter as a GGUF LoRA file, exported on first use and kept under $AIMLQA_HOME/gguf-lora;
    checked against the export its manifest records, if it records one."""
    adapter = Path(adapter)
    out = _export_path(adapter, base)
    if out.is_file():
        return out
    pairs, alpha = _adapter_pairs(adapter, family)
    recorded = _manifest(adapter).get("exports", {}).get("llamacpp", {}).get("digest")
    if recorded and recorded != lora_digest(pairs, alpha):
        raise UserError(f"{adapter}: its GGUF LoRA export differs from the one its manifest records; "
                        f"re-record it with `python -m rag.gguf_lora {adapter.parent}` after checking the adapter's files")
    return _export(out, pairs, alpha, family)


def record_export(root: Path) -> dict:
    """Export a shipped adapter (`root/adapter`) and record the export in `root/manifest.json`."""
    from rag.registry import get_spec

    path = root / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    base, family = manifest["base"], get_spec(manifest["recipe"]["model"]).family
    pairs, alpha = _adapter_pairs(root / "adapter", family)
    exported = _export(_export_path(root / "adapter", base), pairs, alpha, family)  # not checked against the record it replaces
    manifest.setdefault("exports", {})["llamacpp"] = {
        "format": "GGUF LoRA (llama.cpp's convert_lora_to_gguf layout), float16, applied at load time",
        "base": base, "tensors": 2 * len(pairs), "alpha": alpha, "digest": lora_digest(pairs, alpha),
        "exported_by": "rag.gguf_lora.adapter_gguf, on first use; cached under $AIMLQA_HOME/gguf-lora",
        "command": f"python -m rag.gguf_lora {root.as_posix()}",
        "file_bytes": exported.stat().st_size,
    }
    write_json(path, manifest)
    return manifest["exports"]["llamacpp"]


def _export_path(adapter: Path, base: str) -> Path:
    """Where an adapter's export is cached: named for its weights and base, so a changed one is a new file."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter}: no adapter_model.safetensors; the llama.cpp back end needs a peft LoRA adapter directory")
    digest = hashlib.sha256(weights.read_bytes() + base.encode()).hexdigest()[:16]
    return settings.home() / "gguf-lora" / f"{adapter.parent.name or 'adapter'}-{digest}.gguf"


def _export(out: Path, pairs: dict, alpha: float, family: str) -> Path:
    return built_once(out, lambda work: _write_lora(pairs, alpha, ARCHITECTURES[family], work / "adapter.gguf"))


def _manifest(adapter: Path) -> dict:
    path = adapter.parent / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _adapter_pairs(adapter: Path, family: str) -> tuple[dict, float]:
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = {k: v.float().numpy() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}  # bf16 has no numpy type
    return lora_pairs(tensors, config, family)


def export_lora(tensors: dict, config: dict, out: Path, family: str = "gemma3") -> Path:
    """Write peft LoRA tensors as a llama.cpp GGUF adapter, once (`built_once`: no half-written file)."""
    pairs, alpha = lora_pairs(tensors, config, family)
    return _export(Path(out), pairs, alpha, family)


def lora_pairs(tensors: dict, config: dict, family: str = "gemma3") -> tuple[dict, float]:
    """peft's lora_A / lora_B tensors as llama.cpp names them, float16, and the alpha llama.cpp scales by."""
    import numpy as np

    if config.get("use_dora"):
        raise UserError("a DoRA adapter cannot run on llama.cpp; serve it with the transformers back end")
    if family not in ARCHITECTURES:
        raise UserError(f"exporting {family} adapters to GGUF is not supported; serve it with the transformers back end")
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
    return pairs, alpha


def lora_digest(pairs: dict, alpha: float) -> str:
    """What the export holds, independent of the gguf writer's version: names, float16 bytes, alpha."""
    h = hashlib.sha256(repr(alpha).encode())
    for name, pair in sorted(pairs.items()):
        h.update(name.encode() + pair["A"].tobytes() + pair["B"].tobytes())
    return h.hexdigest()[:16]


def _write_lora(pairs: dict, alpha: float, architecture: str, path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
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
    return path


QUANTIZATIONS = {"Q8_0": 7, "Q4_K_M": 15}  # llama.cpp's llama_ftype values


def requantized(model: Path, quantization: str) -> Path:
    """`model` re-quantised by llama.cpp (cached under $AIMLQA_HOME/models/gguf). From an already quantised file this changes
    how the weights are stored and read, not what they are: a speed measurement, not a quality one."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    llama_cpp = require_llamacpp()

    def quantize(work: Path) -> Path:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = QUANTIZATIONS[quantization], True
        out = work / "model.gguf"
        if llama_cpp.llama_model_quantize(str(model).encode(), str(out).encode(), params) != 0:
            raise UserError(f"llama.cpp could not quantize {model} to {quantization}")
        return out

    tag = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:8]
    return built_once(cache_root() / "gguf" / f"{model.stem}-{tag}-{quantization.lower()}.gguf", quantize)


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not (Path(argv[0]) / "manifest.json").is_file():
        sys.exit("usage: python -m rag.gguf_lora rag/adapters/NAME   (a shipped adapter: NAME/manifest.json and NAME/adapter/)")
    try:
        print(json.dumps(record_export(Path(argv[0])), indent=2))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
