"""Recipes: the settings of one fine-tuning run, loaded from YAML and overridable with `--set k=v`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aimlqa.settings import UserError, read_yaml_mapping, validation_message

RECIPES = Path(__file__).with_name("recipes")


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    # adapters on the top N transformer layers only (None: every layer); autograd then stops below
    # them, so the backward pass skips the lower layers (decoder-only models)
    top_layers: int | None = Field(None, ge=1)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    model: str  # a registry name: family, base and template come from there
    base: str | None = None  # override the registry's base (a local dir, e.g. a tiny test model)
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = LoraSettings()
    # a full fine-tune leaves parameters whose names hold any of these frozen: e.g. Gemma 3 270M's
    # embed_tokens, 168M of its 268M parameters and tied to the output layer, whose frozen weight then
    # takes finetune/loss.py's fast cross-entropy
    freeze: list[str] = []
    epochs: float = Field(3, gt=0)
    max_steps: int = -1
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    optim: str = "adamw_torch"
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(384, ge=32)
    eval_every: int = Field(100, ge=1)
    eval_samples: int = Field(48, ge=0)
    best_metric: Literal["rouge1", "rouge2", "rougeL"] = "rougeL"
    max_new_tokens: int = Field(64, ge=1)
    mixed_precision: Literal["auto", "fp16", "bf16", "no"] = "auto"
    seed: int = 3407
    # retrieval-aware training (RAFT): k passages per example from a train-split index, never the
    # example's own Q&A pair (drop_own_pair); for a share of examples every passage holding the
    # answer is removed (finetune/data.py).
    context: Literal["none", "rag"] = "none"
    rag_k: int = Field(3, ge=1)
    # how the training contexts are retrieved. Dense, though answers are served with hybrid retrieval: an
    # adapter trained on hybrid contexts read ROUGE-L 0.283 against 0.298 on the 89 group18 validation
    # questions, both served hybrid (-0.015 [-0.034, +0.001], p = 0.08; 2026-12-02). Validation answers
    # are retrieved as served.
    rag_mode: Literal["dense", "bm25", "hybrid"] = "dense"
    drop_oracle: float = Field(0.5, ge=0, le=1)
    drop_own_pair: bool = True
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # output-layer gradient columns left out where every answer token's probability is below this
    # (Cut Cross-Entropy's gradient filtering; finetune/loss.py); 0: the exact gradient
    head_grad_filter: float = Field(0.0, ge=0, lt=1)
    use_unsloth: bool = True
    gradient_checkpointing: bool = False

    @field_validator("freeze")
    @classmethod
    def _freeze_only_full(cls, value, info):
        method = info.data.get("method")
        if value and method != "full":
            raise ValueError(f"`freeze` is for method=full ({method} trains only its adapters); remove it")
        return value


def _coerce(value: str):
    """`--set` values: YAML scalars, so `lr=1e-4`, `epochs=2`, `context=rag`, `lora.r=8` all work."""
    return yaml.safe_load(value)


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise UserError(f"unknown recipe {name_or_path!r}; known: {known} (or a path to a YAML recipe)")
    data = read_yaml_mapping(path, "a mapping of recipe fields")
    data.setdefault("name", path.stem)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        key, value = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _coerce(value)
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise UserError(f"recipe {data['name']!r}: {validation_message(e, Recipe)}") from None
