"""What produced a result: model (with adapter and fine-tuning manifest), index, data, versions.

Every file the evaluator writes carries these, or a run id that points at them in summary.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from index.store import versions as index_versions
from index.text import sha256_text


def dir_hash(path: Path) -> str:
    """sha256 over every file (relative name and bytes) under a directory, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def finetune_manifest(spec) -> dict | None:
    """The manifest `aimlqa finetune` writes beside its adapter (or full model), if this is one."""
    for p in (spec.adapter, spec.base):
        if p and (Path(p).parent / "manifest.json").is_file():
            try:
                m = json.loads((Path(p).parent / "manifest.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if "recipe" in m:
                return m
    return None


def model_info(spec) -> dict:
    # num_beams: an evaluation passes its own (a cell's decoding is in its generation settings)
    info = spec.model_dump(exclude={"num_beams"})
    for key in ("base", "adapter"):
        p = getattr(spec, key)
        if p and Path(p).is_dir():
            info[f"{key}_sha256"] = dir_hash(Path(p))
    if spec.base.startswith("gguf:"):
        import importlib.metadata as md

        try:
            info["base_package_version"] = md.version(spec.base[len("gguf:") :])
        except md.PackageNotFoundError:
            pass
    m = finetune_manifest(spec)
    if m:
        info["finetune"] = {k: m.get(k) for k in ("name", "base", "method", "data", "split_hashes", "steps", "best_metric", "train_index")}
        info["finetune"]["split_fractions"] = (m.get("recipe") or {}).get("split_fractions")
    info["fine_tuned"] = bool(spec.adapter) or m is not None
    return info


def base_of(name: str, infos: dict[str, dict]) -> str | None:
    """The listed model a fine-tuned one was trained from: same base, no adapter, not fine-tuned."""
    info = infos[name]
    if not info.get("fine_tuned"):
        return None
    base = (info.get("finetune") or {}).get("base") or info["base"]
    for other, o in infos.items():
        if other != name and not o.get("fine_tuned") and o["backend"] != "retrieval" and o["base"] == base:
            return other
    return None


def fingerprint(*parts) -> str:
    return sha256_text(*(json.dumps(p, sort_keys=True, default=str) for p in parts))[:16]


EVAL_PACKAGES = ("evaluate", "rouge-score", "nltk", "numpy")  # what scores depend on, beside the core


def versions() -> dict:
    return index_versions(EVAL_PACKAGES)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
