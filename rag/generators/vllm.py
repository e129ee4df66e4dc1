"""vLLM back end: `LLM` with LoRA enabled and a `LoRARequest` per adapter; needs CUDA."""

from __future__ import annotations

from aimlqa.settings import UserError
from rag.embedded import resolve_base
from rag.generators.base import Generation, GenerationConfig, adapter_names, check_adapter_name, cut_at_stop

ALTERNATIVE = "use the transformers back end instead (`backend: transformers` in the registry, or --backend transformers)"


def require_vllm():
    """vLLM, or a clear error naming the alternative: imported only when this back end is asked for."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"the vLLM back end needs a CUDA GPU and none is available; {ALTERNATIVE}")
    try:
        import vllm
    except ImportError:
        raise UserError(f"the vLLM back end needs the `vllm` package (`pip install -e '.[gpu]'`); {ALTERNATIVE}") from None
    return vllm


class VLLMGenerator:
    """vLLM with LoRA always enabled, so adapters can be added while serving: each prompt carries its
    adapter's `LoRARequest` and vLLM batches different adapters together (its multi-LoRA)."""

    def __init__(self, spec, gpu_memory_utilization: float = 0.85, max_lora_rank: int = 64, max_loras: int = 8):
        vllm = require_vllm()

        self.spec = spec
        self._vllm = vllm
        kwargs = dict(model=resolve_base(spec.base), max_model_len=spec.context_window, gpu_memory_utilization=gpu_memory_utilization,
                      enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras, dtype=spec.dtype)
        if spec.load_in_4bit:
            kwargs.update(quantization="bitsandbytes")
        if spec.tensor_parallel_size > 1:  # one worker per GPU, run by Ray (inside a Serve replica: its placement group)
            kwargs.update(tensor_parallel_size=spec.tensor_parallel_size, distributed_executor_backend="ray")
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.context_window = spec.context_window
        self.loras: dict = {}  # name -> LoRARequest
        self._next_id = 1
        self.default_adapter = None
        if spec.adapter:
            self.load_adapter(spec.name, spec.adapter)
            self.default_adapter = spec.name

    @property
    def adapters(self) -> dict[str, str]:
        return {name: r.lora_path for name, r in self.loras.items()}

    def load_adapter(self, name: str, path: str) -> None:
        """vLLM reads the adapter on its first request; registering it here is bookkeeping."""
        from vllm.lora.request import LoRARequest

        check_adapter_name(name, self.loras, present=False)
        self.loras[name] = LoRARequest(name, self._next_id, str(path))
        self._next_id += 1

    def unload_adapter(self, name: str) -> None:
        check_adapter_name(name, self.loras, present=True)
        request = self.loras.pop(name)
        self.llm.llm_engine.remove_lora(request.lora_int_id)
        if self.default_adapter == name:
            self.default_adapter = None

    def _requests(self, adapters: list[str | None] | None, n: int) -> list:
        return [self.loras[a] if a else None for a in adapter_names(adapters, n, self.default_adapter, self.loras)]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def generate(self, prompts: list[str], config: GenerationConfig, adapters: list[str | None] | None = None) -> list[Generation]:
        loras = self._requests(adapters, len(prompts))
        if config.num_beams > 1:
            return self._beam_search(prompts, config, loras)
        params = self._vllm.SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
            stop=list(config.stop) or None,
            seed=config.seed,
        )
        outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        results = []
        for out in outputs:
            c = out.outputs[0]
            text, _ = cut_at_stop(c.text, config.stop)
            results.append(Generation(text, len(out.prompt_token_ids), len(c.token_ids), "length" if c.finish_reason == "length" else "stop"))
        return results

    def _beam_search(self, prompts: list[str], config: GenerationConfig, loras: list) -> list[Generation]:
        """vLLM runs beam search through `LLM.beam_search`, not `SamplingParams`; stop sequences are cut
        afterwards, as the transformers back end cuts them."""
        from vllm.sampling_params import BeamSearchParams

        params = BeamSearchParams(beam_width=config.num_beams, max_tokens=config.max_new_tokens)
        outputs = self.llm.beam_search([{"prompt": p} for p in prompts], params, lora_request=loras)
        results = []
        for prompt, out in zip(prompts, outputs):
            best = out.sequences[0]
            n_prompt = self.count_tokens(prompt)
            new = [t for t in best.tokens[n_prompt:] if t != self.tokenizer.eos_token_id]
            text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), config.stop)
            finish = "length" if len(new) >= config.max_new_tokens and not stopped else "stop"
            results.append(Generation(text, n_prompt, len(new), finish))
        return results
