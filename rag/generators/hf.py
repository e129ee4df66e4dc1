"""transformers back end: causal and sequence-to-sequence models, CPU or CUDA, optional LoRA adapter."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from aimlqa.settings import UserError
from rag.embedded import resolve_base
from rag.generators.base import Generation, GenerationConfig, adapter_names, check_adapter_name, cut_at_stop


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
    """One base model in memory and any number of LoRA adapters on it, loaded and unloaded while
    serving. A batch may mix adapters (and the base), each row through its own adapter in one forward
    pass (`StackedLoRA`), so requests for different adapters are not serialized."""

    streams = True  # generate() takes sinks that see each row's text as it is decoded

    def __init__(self, spec, device: str | None = None, model=None, tokenizer=None):
        self.spec = spec
        self.device = pick_device(device)
        self.adapters: dict[str, str] = {}  # name -> path, the adapters loaded beside the base
        self.default_adapter: str | None = None  # what a prompt without an adapter of its own uses
        # (the loaded adapters' names, their weights stacked for mixed batches, or None where peft must route)
        self._stacked: tuple[tuple[str, ...], StackedLoRA | None] | None = None
        self._lock = threading.Lock()  # one generate() (or adapter change) at a time; callers batch instead
        if model is None:  # the base alone, or with its adapter merged in; an unmerged adapter is loaded by name below
            model, tokenizer = load_model_and_tokenizer(spec, self.device, adapter=spec.adapter if spec.merge_adapter else "", merge=True)
        self.model, self.tokenizer = model, tokenizer
        self.context_window = min(spec.context_window, getattr(model.config, "max_position_embeddings", None) or spec.context_window)
        if spec.adapter and not spec.merge_adapter and not is_peft(model):
            self.load_adapter(spec.name, spec.adapter)
            self.default_adapter = spec.name

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    # --- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under `name`; a failure leaves the model and its adapters as they were.
        Waits for a running generate() to finish."""
        from peft import PeftModel

        check_adapter_fits(self.model, path)
        with self._lock:
            check_adapter_name(name, self.adapters, present=False)
            # bf16 adapters beside a bf16 base, as they were trained (finetune.model.adapter_autocast)
            keep_dtype = dict(autocast_adapter_dtype=False) if self.model.dtype == torch.bfloat16 else {}
            if is_peft(self.model):
                try:
                    self.model.load_adapter(path, adapter_name=name, **keep_dtype)
                except Exception:
                    if name in self.model.peft_config:
                        self.model.delete_adapter(name)
                    raise
            else:
                base = self.model
                try:
                    self.model = PeftModel.from_pretrained(base, path, adapter_name=name, **keep_dtype)
                except Exception:
                    strip_adapter_layers(base)
                    raise
            if not self.spec.load_in_4bit:
                self.model.to(self.device)
            self.model.eval()
            self.adapters[name] = str(path)
            self._stacked = None

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's weights; waits for a running generate() (which may use it) to finish."""
        with self._lock:
            check_adapter_name(name, self.adapters, present=True)
            if len(self.adapters) == 1:
                self.model = self.model.unload()  # the base again, without LoRA layers or their cost
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
            self._stacked = None
            if self.default_adapter == name:
                self.default_adapter = None

    def _route(self, adapters: list[str | None] | None, n: int):
        """The context that sends each row through its adapter: none for a uniform batch (the active
        adapter, or the base with adapters disabled); for a mixed one, `StackedLoRA` (peft's own
        `adapter_names` routing where that cannot serve). Returns (context, extra generate kwargs)."""
        from contextlib import nullcontext

        names = adapter_names(adapters, n, self.default_adapter, self.adapters)
        if not self.adapters:
            return nullcontext(), {}
        if len(set(names)) == 1:
            if names[0] is None:
                return self.model.disable_adapter(), {}
            self.model.set_adapter(names[0])
            return nullcontext(), {}
        key = tuple(self.adapters)
        if self._stacked is None or self._stacked[0] != key:  # built once per set of loaded adapters
            self._stacked = (key, StackedLoRA.build(self.model, key))
        stacked = self._stacked[1]
        if stacked is None:
            return nullcontext(), {"adapter_names": [a or BASE for a in names]}
        return stacked.route(self.model, [0 if a is None else key.index(a) + 1 for a in names]), {}

    # --- generation ---------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[str], config: GenerationConfig, adapters: list[str | None] | None = None,
                 sinks: list | None = None) -> list[Generation]:
        """`adapters`: per prompt, a loaded adapter's name or None for the base (default: the
        entry's own adapter, if any, for every prompt). `sinks`: per prompt, None or a callable that
        gets the prompt's whole generated text after every decoding step (streaming; not with beams)."""
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
        if sinks and any(sinks) and config.num_beams == 1:
            kwargs.update(streamer=RowStreamer(tok, sinks))
        with self._lock:
            route, extra = self._route(adapters, len(prompts))
            if config.seed is not None:
                torch.manual_seed(config.seed)
            with route:
                out = self.model.generate(**enc, **kwargs, **extra)
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


BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class RowStreamer:
    """transformers' streamer protocol for a whole batch: after each decoding step every row's text so
    far goes to its own sink (TextIteratorStreamer serves one row). Its first `put` is the prompt."""

    def __init__(self, tokenizer, sinks: list):
        self.tokenizer, self.sinks = tokenizer, sinks
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.ended = [sink is None for sink in sinks]
        self.ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if self.ended[row]:
                continue
            if token in self.ends:
                self.ended[row] = True
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                self.sinks[row](text)

    def end(self) -> None:
        pass


class StackedLoRA:
    """Per-row LoRA for a batch that mixes adapters. In every adapted layer the adapters' A matrices
    are concatenated into one (N*r x in) matrix and their B matrices (pre-scaled) into one (N*r x
    out); a row's mask keeps only its own adapter's r columns (none for the base). A layer then costs
    two matmuls and a multiply whatever the number of adapters (the segmented LoRA of Punica and
    S-LoRA, in plain torch ops). peft's own mixed batches loop over the adapters in every layer."""

    def __init__(self, names: tuple[str, ...], layers: list, rank: int):
        self.names, self.layers, self.rank = names, layers, rank  # layers: (LoRA module, A cat^T, B cat)

    @classmethod
    def build(cls, model, names: tuple[str, ...]) -> "StackedLoRA | None":
        """None where only peft can serve the mix (DoRA, or a layer kind other than Linear)."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        found = [m for m in model.modules() if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names)]
        if any(not isinstance(m, LoraLinear) or any(m.use_dora.get(n) for n in names) for m in found):
            return None
        r = max((m.r[n] for m in found for n in names if n in m.lora_A), default=0)
        layers = []
        for module in found:
            ref = module.lora_A[next(n for n in names if n in module.lora_A)].weight
            a_cat = torch.zeros(len(names) * r, module.in_features, dtype=ref.dtype, device=ref.device)
            b_cat = torch.zeros(len(names) * r, module.out_features, dtype=ref.dtype, device=ref.device)
            for i, n in enumerate(names):
                if n in module.lora_A:
                    a, b = module.lora_A[n].weight, module.lora_B[n].weight  # (r_n, in), (out, r_n)
                    a_cat[i * r : i * r + a.shape[0]] = a
                    b_cat[i * r : i * r + b.shape[1]] = (b * module.scaling[n]).T
            layers.append((module, a_cat.T.contiguous(), b_cat))
        return cls(names, layers, r)

    @contextmanager
    def route(self, model, rows: list[int]):
        """Adapters disabled (every LoRA layer computes its base only) and a hook on each adapted layer
        adding its rows' deltas. `rows`: per prompt, 1 + its adapter's index in `names`, 0 for the
        base. Beam search repeats each prompt's mask for its beams."""
        if not self.layers:
            with model.disable_adapter():
                yield
            return
        ref = self.layers[0][1]
        mask = torch.zeros(len(rows), 1, len(self.names) * self.rank, dtype=ref.dtype, device=ref.device)
        for row, a in enumerate(rows):
            if a:
                mask[row, 0, (a - 1) * self.rank : a * self.rank] = 1
        masks = {len(rows): mask}

        def hook(a_cat_t, b_cat):
            def add_delta(module, args, out):
                x = args[0]
                if x.shape[0] not in masks:
                    masks[x.shape[0]] = mask.repeat_interleave(x.shape[0] // len(rows), dim=0)
                flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_cat_t.dtype)
                delta = ((flat @ a_cat_t) * masks[x.shape[0]]) @ b_cat
                return out + delta.reshape(*out.shape[:-1], delta.shape[-1]).to(out.dtype)

            return add_delta

        handles = [m.register_forward_hook(hook(a, b)) for m, a, b in self.layers]
        try:
            with model.disable_adapter():
                yield
        finally:
            for h in handles:
                h.remove()


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def strip_adapter_layers(model) -> None:
    """Undo a half-done adapter injection: every LoRA-wrapped layer back to its base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def in_out_features(layer) -> tuple[int, int] | None:
    """A layer LoRA can adapt: nn.Linear, or GPT-2's Conv1D (its weight stored in x out)."""
    if layer is None:
        return None
    if hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D":
        return tuple(layer.weight.shape)
    return None


def check_adapter_fits(model, path: str) -> None:
    """Read an adapter dir and check every LoRA matrix against the layer it adapts, before the model
    is touched: a corrupt file, another architecture or another size is a UserError saying which."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except Exception as e:  # bad JSON, a truncated safetensors file, missing files: peft's many errors
        raise UserError(f"{path}: not a readable adapter ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if config.peft_type != "LORA":
        raise UserError(f"{path}: a {config.peft_type} adapter; only LoRA adapters can be served")
    base = model.get_base_model() if is_peft(model) else model
    modules = dict(base.named_modules())
    for key, tensor in weights.items():
        if ".lora_A" not in key and ".lora_B" not in key:
            continue
        where = key.removeprefix("base_model.model.").split(".lora_")[0]
        layer = modules.get(where)
        sizes = in_out_features(getattr(layer, "base_layer", layer))
        if sizes is None:
            raise UserError(f"{path}: adapts `{where}`, which this model does not have: it was trained on another base model")
        want = sizes[0] if ".lora_A" in key else sizes[1]
        got = tensor.shape[1] if ".lora_A" in key else tensor.shape[0]
        if got != want:
            raise UserError(f"{path}: `{where}` is {want} wide in this model but {got} in the adapter: it was trained on another base model")
