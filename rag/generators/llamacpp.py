"""llama.cpp back end: the packaged GGUF served by llama.cpp's own CPU kernels through
llama-cpp-python, as packaged (Q4_K_M) or re-quantised once (`quantize: Q8_0` in the registry:
on this 2-core CPU the 8-bit kernels decode faster than the 4-bit ones, bench/results/llamacpp.json).
transformers de-quantises the same file to bf16 and reads twice the bytes per token.

What it cannot do, it says (the registry's `backend: llamacpp` entries): beam search, and
batches mixing adapters. A model's adapter is exported once to a GGUF LoRA file
(`rag.gguf_lora`) and applied by llama.cpp at load time. The greedy prompts of a batch are decoded
together (`BatchDecoder`, a sequence each); sampled ones, and those with a repetition penalty, one
after another through llama-cpp-python's own loop.
"""

from __future__ import annotations

import threading

from aimlqa import settings
from aimlqa.settings import UserError
from rag.generators.base import Generation, GenerationConfig
from rag.gguf_lora import ALTERNATIVE, adapter_gguf, model_file, require_llamacpp

BATCH_SEQUENCES = 8  # sequences the batched context holds (the server's default max batch size)


class LlamaCppGenerator:
    streams = True

    def __init__(self, spec, n_threads: int | None = None):
        llama_cpp = require_llamacpp()
        self.spec = spec
        self.context_window = spec.context_window
        model = model_file(spec)
        lora = str(adapter_gguf(spec.adapter, spec.base, spec.family)) if spec.adapter else None
        self._threads = n_threads or settings.threads()
        with llama_cpp._utils.suppress_stdout_stderr(disable=False):  # llama.cpp logs each adapted tensor from C, whatever `verbose` says
            self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=spec.context_window, n_threads=self._threads,
                                       n_batch=512, lora_path=lora, seed=0, verbose=False)
        self._lock = threading.Lock()  # one generate call at a time on this model
        self._batched: BatchDecoder | None = None

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def generate(self, prompts: list[str], config: GenerationConfig, sinks: list | None = None) -> list[Generation]:
        if config.num_beams > 1:
            raise UserError(f"{self.spec.name} runs on llama.cpp, which has no beam search (num_beams={config.num_beams}); "
                            f"use num_beams 1, or {ALTERNATIVE}")
        sinks = sinks or [None] * len(prompts)
        with self._lock:
            if config.greedy and config.repetition_penalty == 1.0:
                return self._together(prompts, config, sinks)
            return [self._one(p, config, sink) for p, sink in zip(prompts, sinks)]

    def _together(self, prompts: list[str], config: GenerationConfig, sinks: list) -> list[Generation]:
        """Greedy prompts decoded as one batch (`BatchDecoder`), a single one too: its loop is leaner than
        `create_completion`'s (73 against 66 tokens/s here); sampling goes one prompt at a time."""
        if self._batched is None or self._batched.n_seq < len(prompts):
            if self._batched is not None:
                self._batched.close()
            self._batched = BatchDecoder(self.llm, max(len(prompts), BATCH_SEQUENCES), self.context_window, self._threads)
        tokens = [self.llm.tokenize(p.encode("utf-8"), add_bos=True, special=True) for p in prompts]
        done = self._batched.generate(tokens, config.max_new_tokens, config.stop, sinks)
        return [Generation(text, len(t), n, finish) for (text, n, finish), t in zip(done, tokens)]

    def _one(self, prompt: str, config: GenerationConfig, sink) -> Generation:
        kw = dict(max_tokens=config.max_new_tokens, stop=list(config.stop) or None, repeat_penalty=config.repetition_penalty, seed=config.seed)
        # greedy at temperature 0; sampling as transformers does it: top-p only (no top-k or min-p cut)
        kw |= dict(temperature=0.0) if config.greedy else dict(temperature=config.temperature, top_p=config.top_p, top_k=0, min_p=0.0)
        if sink is None:
            reply = self.llm.create_completion(prompt, **kw)
            choice, usage = reply["choices"][0], reply["usage"]
            return Generation(choice["text"], usage["prompt_tokens"], usage["completion_tokens"], _finish(choice["finish_reason"]))
        text, steps, finish = "", 0, None
        for chunk in self.llm.create_completion(prompt, stream=True, **kw):
            choice = chunk["choices"][0]
            text += choice["text"]
            steps += 1
            finish = choice.get("finish_reason") or finish
            sink(text)
        return Generation(text, self.count_tokens(prompt) + 1, min(steps, config.max_new_tokens), _finish(finish))


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class BatchDecoder:
    """Greedy decoding of several prompts at once on one llama.cpp context with a sequence per prompt:
    each step decodes one token of every unfinished sequence in a single `llama_decode`, so the
    weights are read once per step for the whole batch, as transformers' batches do. Prompts are
    prefilled together too (chunks of `n_batch` tokens). The model's LoRA adapter, if any, is set on
    this context as on the model's own."""

    def __init__(self, llm, n_seq: int, n_ctx_seq: int, n_threads: int):
        import ctypes

        import llama_cpp as L

        self.L, self.llm, self.n_seq = L, llm, n_seq
        params = L.llama_context_default_params()
        params.n_ctx = n_seq * n_ctx_seq
        params.n_seq_max = n_seq
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = True
        self.ctx = L.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise UserError("llama.cpp could not create a batched context; lower the batch size")
        if llm._lora_adapter is not None:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
            L.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(llm.lora_scale))
        self.vocab = llm.n_vocab()
        self._vocab = L.llama_model_get_vocab(llm._model.model)
        self.batch = L.llama_batch_init(512, 0, n_seq)

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits), at most n_batch of them."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        import numpy as np

        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())

    def generate(self, prompts: list[list[int]], max_new: int, stop: tuple[str, ...], sinks: list) -> list[tuple[str, int, str]]:
        """(text, completion tokens, finish reason) per prompt."""
        from rag.generators.base import cut_at_stop

        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        # prefill: every prompt's tokens, each prompt's last one asking for logits
        pending = [(t, p, s, p == len(toks) - 1) for s, toks in enumerate(prompts) for p, t in enumerate(toks)]
        nxt: dict[int, int] = {}
        for start in range(0, len(pending), 512):
            chunk = pending[start : start + 512]
            self._decode(chunk)  # its logits are gone at the next decode: read them now
            nxt |= {s: self._argmax(i) for i, (_, _, s, want) in enumerate(chunk) if want}
        out: list[list[int]] = [[] for _ in prompts]
        texts, finish = [""] * len(prompts), [None] * len(prompts)
        active = list(range(len(prompts)))
        while active:
            for s in list(active):
                tok = nxt[s]
                if self.L.llama_vocab_is_eog(self._vocab, tok):  # end of generation: EOS, end of turn
                    finish[s] = "stop"
                    active.remove(s)
                    continue
                out[s].append(tok)
                text = self.llm.detokenize(out[s]).decode("utf-8", errors="ignore")
                text, stopped = cut_at_stop(text, stop)
                texts[s] = text
                if sinks[s] is not None:
                    sinks[s](text)
                if stopped or len(out[s]) >= max_new:
                    finish[s] = "stop" if stopped else "length"
                    active.remove(s)
            if not active:
                break
            self._decode([(nxt[s], len(prompts[s]) + len(out[s]) - 1, s, True) for s in active])
            nxt = {s: self._argmax(i) for i, s in enumerate(active)}
        return [(texts[s], len(out[s]), finish[s]) for s in range(len(prompts))]
