"""Loading a model for training: full, LoRA (peft) or 4-bit QLoRA (Unsloth or peft + bitsandbytes)."""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from aimlqa.settings import UserError


def check_hardware(recipe) -> None:
    """Refuse a 4-bit recipe up front on a machine without CUDA: no half-run."""
    if recipe.method == "qlora" and not torch.cuda.is_available():
        raise UserError(
            f"recipe {recipe.name!r} trains a 4-bit (QLoRA) model and needs a CUDA GPU; none is available here. "
            "On a CPU use `gemma-270m-lora` or `gpt2-lora`"
        )


def lora_settings(recipe, config) -> dict:
    """The adapter settings peft's LoraConfig and Unsloth's get_peft_model both take."""
    lora = recipe.lora
    settings = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, bias="none")
    if lora.top_layers is not None:
        n = getattr(config, "num_hidden_layers", None)
        if config.is_encoder_decoder or not n:
            raise UserError(f"recipe {recipe.name!r}: lora.top_layers is for decoder-only models; remove it for {recipe.model!r}")
        if lora.top_layers > n:
            raise UserError(f"recipe {recipe.name!r}: lora.top_layers={lora.top_layers} but {recipe.model!r} has {n} layers")
        settings.update(layers_to_transform=list(range(n - lora.top_layers, n)))
    return settings


def lora_config(recipe, config):
    from peft import LoraConfig, TaskType

    task = TaskType.SEQ_2_SEQ_LM if config.is_encoder_decoder else TaskType.CAUSAL_LM
    return LoraConfig(task_type=task, **lora_settings(recipe, config))


def load_for_training(spec, recipe):
    """(model, tokenizer, how): the trainable model the recipe asks for."""
    check_hardware(recipe)
    if recipe.method == "qlora":
        return _load_qlora(spec, recipe)
    from peft import get_peft_model

    from rag.generators.hf import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec, adapter="", trainable=recipe.method == "full")
    if recipe.method == "lora":
        model = get_peft_model(model, lora_config(recipe, model.config))
    freeze(model, recipe)
    model.train()
    return model, tok, f"{recipe.method} (peft)" if recipe.method == "lora" else "full"


def freeze(model, recipe) -> None:
    """Leave the parameters `recipe.freeze` names out of a full fine-tune; each name must match one."""
    if not recipe.freeze:
        return
    names = [n for n, _ in model.named_parameters()]
    for pattern in recipe.freeze:
        if not any(pattern in n for n in names):
            raise UserError(f"recipe {recipe.name!r}: freeze {pattern!r} names no parameter of {recipe.model!r}, e.g. {names[0]!r}")
    for n, p in model.named_parameters():
        if any(pattern in n for pattern in recipe.freeze):
            p.requires_grad_(False)


def base_model(model):
    """The transformers model under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def adapter_autocast(model):
    """LoRA's float32 adapters computed in bf16 beside a frozen bf16 base on a CPU, as autocast does on a GPU.

    peft casts each adapter's input up to float32 and sums its output in float32 before casting back:
    on 2 CPU cores those casts and sums were a tenth of a training step. Under bf16 autocast with
    that cast off, the adapters' matmuls take bf16 copies of their (r x d) weights, while the weights
    and their gradients stay float32 for the optimizer. Elsewhere (a GPU, whose trainer autocasts; a
    float32 base; no adapters) it changes nothing."""
    hf = base_model(model)
    if not hasattr(model, "peft_config") or hf.device.type != "cpu" or hf.dtype != torch.bfloat16:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model):
        yield


def _load_qlora(spec, recipe):
    if recipe.use_unsloth and importlib.util.find_spec("unsloth") is not None:
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(spec.base, max_seq_length=recipe.max_length, load_in_4bit=True, dtype=None)
        model = FastLanguageModel.get_peft_model(
            model,
            **lora_settings(recipe, model.config),
            use_gradient_checkpointing="unsloth",
            random_state=recipe.seed,
        )
        how = "qlora (unsloth)"
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        from rag.generators.hf import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(spec.model_copy(update={"load_in_4bit": True}), device="cuda", adapter="", trainable=True)
        model = prepare_model_for_kbit_training(model)
        model = get_peft_model(model, lora_config(recipe, model.config))
        how = "qlora (peft + bitsandbytes)"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, how
