"""transformers back end: causal and sequence-to-sequence models, CPU or CUDA, optional LoRA adapter."""

from __future__ import annotations

import threading

import torch

from aimlqa.settings import UserError
from rag.embedded import resolve_base
from rag.generators.base import Generation, GenerationConfig, cut_at_stop


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slower there); bf16 on GPUs that have it, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model_and_tokenizer(spec, device: str | None = None, adapter: str | None = None, merge: bool = False, trainable: bool = False):
    """The base model (and adapter) a registry entry names, shared by serving and fine-tuning."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    device = pick_device(device)
    if spec.load_in_4bit and not device.startswith("cuda"):
        raise UserError(
            f"model {spec.name!r} is a 4-bit checkpoint and needs a CUDA GPU; on this machine use "
            "`gemma-270m`, `gpt2` or `bart-large-xsum` with the transformers back end"
        )
    base = resolve_base(spec.base)
    cls = AutoModelForSeq2SeqLM if spec.seq2seq else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = cls.from_pretrained(base, dtype=pick_dtype(device))
    except OSError as e:
        raise UserError(
            f"cannot load model {spec.name!r} from {base!r}: {str(e).splitlines()[0]} "
            "(no model hub is reachable here: point `base` at a local directory)"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not spec.seq2seq:
        tokenizer.padding_side = "left"
    adapter = adapter if adapter is not None else spec.adapter
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        if merge:
            model = model.merge_and_unload()
    model.to(device)
    if not trainable:
        model.eval()
    return model, tokenizer


class TransformersGenerator:
    def __init__(self, spec, device: str | None = None, model=None, tokenizer=None):
        self.spec = spec
        self.device = pick_device(device)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(spec, self.device, merge=spec.merge_adapter)
        self.model, self.tokenizer = model, tokenizer
        self.context_window = min(spec.context_window, getattr(model.config, "max_position_embeddings", None) or spec.context_window)
        self._lock = threading.Lock()  # one generate() at a time per model; callers batch instead

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @torch.inference_mode()
    def generate(self, prompts: list[str], config: GenerationConfig) -> list[Generation]:
        if not prompts:
            return []
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(self.device)
        kwargs = dict(
            max_new_tokens=config.max_new_tokens,
            do_sample=not config.greedy,
            pad_token_id=tok.pad_token_id,
            repetition_penalty=config.repetition_penalty,
        )
        if not config.greedy:
            kwargs.update(temperature=config.temperature, top_p=config.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if config.stop and not self.spec.seq2seq:
            kwargs.update(stop_strings=list(config.stop), tokenizer=tok)
        with self._lock:
            if config.seed is not None:
                torch.manual_seed(config.seed)
            out = self.model.generate(**enc, **kwargs)
        new = out if self.spec.seq2seq else out[:, enc["input_ids"].shape[1] :]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_prompt in zip(new, prompt_lens):
            ids = row.tolist()
            if self.spec.seq2seq and ids and ids[0] == self.model.config.decoder_start_token_id:
                ids = ids[1:]
            n = len(ids)
            ended = False
            for i, t in enumerate(ids):
                if t in (tok.eos_token_id, tok.pad_token_id):
                    n, ended = i, True
                    break
            text, stopped = cut_at_stop(tok.decode(ids[:n], skip_special_tokens=True), config.stop)
            finish = "stop" if ended or stopped or n < config.max_new_tokens else "length"
            results.append(Generation(text, int(n_prompt), n, finish))
        return results
