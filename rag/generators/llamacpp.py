"""llama.cpp back end: the packaged GGUF served as it is (4-bit weights, read by llama.cpp's own CPU
kernels), through llama-cpp-python. transformers de-quantises the same file to bf16 and reads
every byte of it per token; this reads a quarter of that.

What it cannot do, it says (the registry's `backend: llamacpp` entries): beam search, and
batches mixing adapters. A model's adapter is exported once to a GGUF LoRA file
(`rag.gguf_lora`) and applied by llama.cpp at load time. Prompts of one batch are decoded one after
another on one model: llama.cpp's own threads use every core already.
"""

from __future__ import annotations

import os
import threading

from aimlqa.settings import UserError
from rag.generators.base import Generation, GenerationConfig

ALTERNATIVE = "use a transformers model instead (e.g. -m gemma-270m-aiml)"


def require_llamacpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("the llama.cpp back end needs llama-cpp-python (`make install` builds it, "
                        f"or `pip install -e '.[llamacpp]'`); {ALTERNATIVE}") from None
    return llama_cpp


class LlamaCppGenerator:
    streams = True

    def __init__(self, spec, n_threads: int | None = None):
        from rag.gguf_lora import adapter_gguf, gguf_file

        llama_cpp = require_llamacpp()
        self.spec = spec
        self.context_window = spec.context_window
        model = gguf_file(spec.base)
        lora = str(adapter_gguf(spec.adapter, spec.base)) if spec.adapter else None
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp logs each adapted tensor from C, whatever `verbose` says
            self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=spec.context_window, n_threads=n_threads or os.cpu_count(),
                                       n_batch=512, lora_path=lora, seed=0, verbose=False)
        self._lock = threading.Lock()  # one decoding sequence at a time on this model

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def generate(self, prompts: list[str], config: GenerationConfig, sinks: list | None = None) -> list[Generation]:
        if config.num_beams > 1:
            raise UserError(f"{self.spec.name} runs on llama.cpp, which has no beam search (num_beams={config.num_beams}); "
                            f"use num_beams 1, or {ALTERNATIVE}")
        sinks = sinks or [None] * len(prompts)
        with self._lock:
            return [self._one(p, config, sink) for p, sink in zip(prompts, sinks)]

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
