"""Package a fine-tuning run as a shipped adapter: the adapter in bf16, its manifest with paths made
relative to the repository, the sha256 of every file, the command that reproduces it, and its
export to a GGUF LoRA for llama.cpp (`rag.gguf_lora.record_export`).

    python -m finetune.ship RUN_DIR rag/adapters/NAME --command "aimlqa finetune ..."
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from aimlqa import settings

KEEP = ("name", "recipe", "method", "base", "split_hashes", "split_sizes", "train_index", "train_tokens", "answer_tokens", "steps",
        "train_runtime_s", "wall_s", "best_metric", "final_metrics", "versions")


def relative(path: str) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(settings.REPO_ROOT).as_posix()
    except ValueError:
        return p.name


def ship(run: Path, dest: Path, command: str, machine: str = "") -> dict:
    """`dest`'s name becomes the manifest's name (the registry entry that serves it)."""
    import torch
    from safetensors.torch import load_file, save_file

    manifest = json.loads((run / "manifest.json").read_text())
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapter").mkdir(parents=True)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = manifest["base"]  # the registry's name for it, not this machine's cache path
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, tmp / "adapter" / "adapter_model.safetensors")
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((tmp / "adapter").iterdir())}
    out = {k: manifest.get(k) for k in KEEP} | {
        "name": dest.name,
        "trained_as": manifest.get("name"),
        "data": [relative(p) for p in manifest.get("data", [])],
        "best_checkpoint_step": int(str(manifest.get("best_checkpoint") or "-0").rsplit("-", 1)[-1] or 0),
        "command": command,
        "trained_on": machine,
        "files": files,
        "dtype": "bfloat16 (trained with bf16 adapters beside the bf16 base on CPU)",
    }
    (tmp / "manifest.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return out | {"exports": {"llamacpp": llamacpp_export(dest)}}


def llamacpp_export(dest: Path) -> dict:
    """The adapter exported to a GGUF LoRA for the llama.cpp back end, recorded in its manifest; where a
    family or method cannot be exported, why (it is then served by transformers only)."""
    from aimlqa.settings import UserError
    from rag.gguf_lora import record_export

    try:
        return record_export(dest)
    except UserError as e:
        return {"unavailable": str(e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--command", required=True)
    ap.add_argument("--machine", default="")
    a = ap.parse_args()
    out = ship(a.run, a.dest, a.command, a.machine)
    print(json.dumps({k: out[k] for k in ("name", "steps", "best_metric", "files")}, indent=2))


if __name__ == "__main__":
    main()
