"""Which adapter a `load_lora_adapter` request may name: a directory that `aimlqa finetune` wrote,
under the adapters root, whose manifest names the base it was trained on.

A request names a path, so this is where the server's one path rule is kept: nothing outside the
root, whether by `..`, an absolute path elsewhere or a symbolic link, is read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from server.errors import ApiError

ADAPTER_FILES = ("adapter_config.json",)


@dataclass
class AdapterDir:
    path: Path  # the directory peft loads (adapter_config.json + weights)
    manifest: dict  # what finetune wrote beside it: base, method, recipe, data hashes

    @property
    def base(self) -> str:
        return str(self.manifest.get("base", ""))


def bad(message: str, code: str = "invalid_adapter", status: int = 400) -> ApiError:
    return ApiError(status, message, code)


def locate(root: Path, lora_path: str) -> AdapterDir:
    """The adapter `lora_path` names (relative to `root`, or absolute inside it), checked; an
    ApiError says what is wrong otherwise."""
    root = Path(root)
    if any(ord(c) < 32 for c in lora_path):
        raise bad(f"lora_path {lora_path!r} holds control characters; give a directory name under the adapters directory")
    given = Path(lora_path)
    if ".." in given.parts:
        raise bad(f"lora_path {lora_path!r} contains '..'; name a directory under the adapters directory", "path_outside_root", 403)
    try:
        real_root = root.resolve()
        real = (given if given.is_absolute() else root / given).resolve()
    except (OSError, ValueError) as e:
        raise bad(f"lora_path {lora_path!r} is not a usable path ({e})") from None
    if not real.is_relative_to(real_root):
        raise bad(f"lora_path {lora_path!r} is outside the adapters directory {root}; only adapters under it can be loaded "
                  "(`aimlqa finetune` writes them there)", "path_outside_root", 403)
    if not real.is_dir():
        raise bad(f"lora_path {lora_path!r}: no such directory under {root}", "adapter_not_found", 404)
    if (real / "adapter" / "adapter_config.json").is_file():
        adapter, manifest = real / "adapter", real / "manifest.json"
    elif (real / "adapter_config.json").is_file():
        adapter, manifest = real, next((m for m in (real / "manifest.json", real.parent / "manifest.json") if m.is_file()), real / "manifest.json")
    else:
        raise bad(f"lora_path {lora_path!r} holds no LoRA adapter (adapter_config.json); give the directory `aimlqa finetune` wrote")
    for f in [manifest, *adapter.iterdir()]:
        if f.exists() and not f.resolve().is_relative_to(real_root):
            raise bad(f"lora_path {lora_path!r}: {f.name} links outside the adapters directory {root}", "path_outside_root", 403)
    if not manifest.is_file():
        raise bad(f"lora_path {lora_path!r} has no manifest.json; the server loads only adapters whose manifest names their base "
                  "(what `aimlqa finetune` writes)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"lora_path {lora_path!r}: manifest.json is not valid JSON ({e}); re-run the fine-tune that wrote it") from None
    if not isinstance(data, dict) or not data.get("base"):
        raise bad(f"lora_path {lora_path!r}: manifest.json does not name the base model the adapter was trained on")
    if data.get("method") == "full":
        raise bad(f"lora_path {lora_path!r} is a full fine-tune (a whole model), not an adapter; serve it with `aimlqa serve -m NAME`")
    return AdapterDir(adapter, data)
