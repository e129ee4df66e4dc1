"""transformers back end: causal and sequence-to-sequence models, CPU or CUDA, optional LoRA adapter."""

from __future__ import annotations

import threading

import torch

from aimlqa.settings import UserError
from rag.embedded import resolve_base
from rag.generators.base import Generation, GenerationConfig, cut_at_stop


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """Native bf16 dot products (Intel AMX tiles, or AVX-512 BF16 on Zen 4 and Cooper Lake) run
    gemma-270m's decoding 2-3x faster than float32 (2.9x on 2 AMX cores, 2.0x at batch 1 and 3.0x
    at batch 16 on 2 Zen 4 cores); on AVX2 alone bf16 is emulated and slower, and float32 is exact."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(device: str, trainable: bool = False, requested: str = "auto") -> torch.dtype:
    """A registry entry's dtype, or for `auto`: bf16 on GPUs that have it, else fp16; on CPU, bf16
    where the CPU has native bf16 (inference, and frozen base weights under LoRA, whose adapters peft
    keeps in float32), float32 for weights that are themselves trained and everywhere else."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if not trainable and cpu_has_fast_bf16() else torch.float32


def bnb_4bit_config():
    """NF4 with double quantization and bf16 (else fp16) compute: the QLoRA settings, for training
    (finetune.model) and serving alike. A pre-quantized checkpoint's own config takes precedence."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


class StopOnStrings:
    """Stops each row once its generated text holds a stop sequence. transformers' own
    `stop_strings` precomputes tables over the whole vocabulary and costs a third of a
    262k-vocabulary model's decoding step on CPU. Decoding each row's last few new tokens (a
    window longer than any stop sequence's own tokenisation) finds the same stops in microseconds."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.window = 2 + max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)


def load_model_and_tokenizer(spec, device: str | None = None, adapter: str | None = None, merge: bool = False, trainable: bool = False):
    """The base model (and adapter) a registry entry names, shared by serving and fine-tuning.
    `trainable`: the base weights themselves are trained (a full fine-tune)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    device = pick_device(device)
    if spec.load_in_4bit and not device.startswith("cuda"):
        raise UserError(
            f"model {spec.name!r} is a 4-bit checkpoint and needs a CUDA GPU; on this machine use "
            "`gemma-270m`, `gpt2` or `bart-large-xsum` with the transformers back end"
        )
    base = resolve_base(spec.base)
    cls = AutoModelForSeq2SeqLM if spec.seq2seq else AutoModelForCausalLM
    # a 4-bit base is quantized as it loads, onto its GPU (bitsandbytes weights are placed, not moved)
    quant = dict(quantization_config=bnb_4bit_config(), device_map={"": torch.device(device).index or 0}) if spec.load_in_4bit else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = cls.from_pretrained(base, dtype=pick_dtype(device, trainable, spec.dtype), **quant)
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
    if not spec.load_in_4bit:
        model.to(device)
    if not trainable:
        model.eval()
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model, tokenizer


def _contiguous_input(module, args):
    """generate() feeds the output layer the last position of each row, a strided slice. When the
    weight is frozen (requires_grad False, as peft leaves a loaded adapter's model), torch.matmul
    will not fold that slice into one mm and broadcasts the weight per row instead: for gemma's
    262k x 640 output layer, a 16-prompt prefill took 15 s instead of 0.5 s."""
    return (args[0].contiguous(), *args[1:])


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
            num_beams=config.num_beams,
        )
        if not config.greedy:
            kwargs.update(temperature=config.temperature, top_p=config.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.spec.prefill_chunk and not self.spec.seq2seq:
            kwargs.update(prefill_chunk_size=self.spec.prefill_chunk)
        if config.stop and not self.spec.seq2seq:
            from transformers import StoppingCriteriaList

            kwargs.update(stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, config.stop, enc["input_ids"].shape[1])]))
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
