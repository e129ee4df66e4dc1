"""The model registry: name → family, base, adapter, backend and generation defaults.

Built-in entries live in `rag/models.yaml`; a user file (`AIMLQA_MODELS`, default
`$AIMLQA_HOME/models.yaml`) adds or overrides entries, and fine-tuning registers there.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from aimlqa import settings
from aimlqa.settings import UserError, read_yaml_mapping, validation_message

BUILTIN = Path(__file__).with_name("models.yaml")
SEQ2SEQ_FAMILIES = {"bart"}


class ModelSpec(BaseModel):
    name: str
    family: Literal["gemma3", "gpt2", "bart", "mistral", "llama", "none"]
    base: str = ""
    adapter: str | None = None
    backend: Literal["transformers", "llamacpp", "vllm", "retrieval"] = "transformers"
    merge_adapter: bool = False
    load_in_4bit: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: see rag.generators.hf.pick_dtype
    context_window: int = Field(1024, ge=64)
    max_new_tokens: int = Field(96, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)
    num_beams: int = Field(1, ge=1, le=16)  # beam search when > 1 (greedy only)
    prefill_chunk: int = Field(128, ge=0)  # prompt tokens per forward pass (causal models); 0: one pass
    quantize: Literal["Q8_0", "Q4_K_M"] | None = None  # llama.cpp: re-quantise the GGUF once at first load (None: as packaged)
    tensor_parallel_size: int = Field(1, ge=1, le=8)  # vLLM: GPUs one replica splits the model over (Ray runs the workers)
    description: str = ""

    @model_validator(mode="after")
    def _parallel_needs_vllm(self):
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs backend: vllm (the {self.backend} back end runs on one device)")
        if self.quantize and self.backend != "llamacpp":
            raise ValueError(f"quantize {self.quantize} is for backend: llamacpp (it re-quantises a GGUF file)")
        return self

    @property
    def seq2seq(self) -> bool:
        return self.family in SEQ2SEQ_FAMILIES


def user_registry_path() -> Path:
    return Path(os.environ.get("AIMLQA_MODELS", settings.home() / "models.yaml"))


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    return read_yaml_mapping(path, "a mapping of model names to settings")


def _builtin() -> dict:
    """The shipped entries; a shipped adapter's path is relative to this package."""
    entries = _read(BUILTIN)
    for fields in entries.values():
        if fields and fields.get("adapter") and not Path(fields["adapter"]).is_absolute():
            fields["adapter"] = str(BUILTIN.parent / fields["adapter"])
    return entries


def load_registry() -> dict[str, ModelSpec]:
    entries = _builtin() | _read(user_registry_path())
    out = {}
    for name, fields in entries.items():
        try:
            out[name] = ModelSpec(name=name, **(fields or {}))
        except ValidationError as e:
            raise UserError(f"model {name!r} in the registry is invalid: {validation_message(e, ModelSpec)}") from None
    return out


def get_spec(name: str) -> ModelSpec:
    registry = load_registry()
    if name not in registry:
        raise UserError(f"unknown model {name!r}; registered models: {', '.join(sorted(registry))}")
    return registry[name]


def register(name: str, **fields) -> ModelSpec:
    """Add or replace a user entry (e.g. a fine-tuned adapter), safely against concurrent writers."""
    spec = ModelSpec(name=name, **fields)
    path = user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(path)
        data[name] = spec.model_dump(exclude={"name"}, exclude_defaults=True) | {"family": spec.family}
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=True))
        tmp.replace(path)
    return spec
