"""The GPU paths, on tiny random models: run only where CUDA is (`pip install -e '.[gpu]'`, then
`pytest -m gpu`). CI and the development machines have no GPU, so here every test is skipped; what
runs here instead are the up-front refusals (test_finetune, test_rag)."""

from __future__ import annotations

import pytest
import torch

from finetune.recipe import load_recipe
from tests.tiny import FAST, qa_rows, tiny_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pytest -m gpu on a machine with one"),
]


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A tiny llama with head size 64: GPU attention kernels (vLLM's, Unsloth's) may not take the
    usual tiny model's 16."""
    from tests.tiny import build_tiny

    return build_tiny("llama", tmp_path_factory.mktemp("llama64"), hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)


@pytest.mark.parametrize("use_unsloth", [False, True], ids=["peft+bitsandbytes", "unsloth"])
def test_qlora_recipe_trains_a_4bit_base_saves_and_answers(use_unsloth, llama64, tmp_path, aimlqa_home):
    pytest.importorskip("bitsandbytes")
    if use_unsloth:
        pytest.importorskip("unsloth")
    from finetune.run import finetune
    from rag.answer import Answerer
    from rag.registry import get_spec, register

    register("tiny-llama", family="llama", base=str(llama64), context_window=256, max_new_tokens=8, load_in_4bit=True)
    recipe = load_recipe("llama-3.1-8b-qlora", FAST + ["model=tiny-llama", "lora.target_modules=[q_proj,v_proj]", f"use_unsloth={use_unsloth}"])
    m = finetune(recipe, [qa_rows(tmp_path)], tmp_path / "out", name="tuned-4bit", progress=False)
    assert m["method"] == ("qlora (unsloth)" if use_unsloth else "qlora (peft + bitsandbytes)")
    assert m["steps"] == 3 and m["recipe"]["optim"] == "adamw_8bit" and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    answerer = Answerer(get_spec("tuned-4bit"))
    assert any("4bit" in type(mod).__name__ for mod in answerer.generator.model.modules())  # served on the 4-bit base
    a = answerer.answer("What is dropout number 3?", rag=False)
    assert 0 < a.prompt_tokens and a.completion_tokens <= 8 and a.model == "tuned-4bit"
    assert any(w.abs().sum() > 0 for n, w in answerer.generator.model.named_parameters() if "lora_B" in n)  # trained, not the zero init


def test_lora_recipe_trains_under_bf16_autocast_on_cuda(tiny_models, tmp_path, aimlqa_home):
    from finetune.run import finetune
    from finetune.trainer import training_arguments
    from rag.registry import register

    register("tiny-gemma3", family="gemma3", base=str(tiny_models["gemma3"]), context_window=256, max_new_tokens=8)
    recipe = load_recipe("gemma-270m-lora", FAST + ["model=tiny-gemma3", "lora.target_modules=[q_proj,v_proj]", "lora.top_layers=1"])
    assert training_arguments(recipe, tmp_path, 8, eval_enabled=True).bf16 == torch.cuda.is_bf16_supported()
    m = finetune(recipe, [qa_rows(tmp_path)], tmp_path / "out", name="tuned-cuda", progress=False)
    assert m["steps"] == 3 and m["final_metrics"]["eval_rougeL"] == m["best_metric"]  # the kept checkpoint is the best


def test_vllm_generates_what_transformers_does_greedily(llama64):
    pytest.importorskip("vllm")
    from rag.generators.base import GenerationConfig
    from rag.generators.hf import TransformersGenerator
    from rag.generators.vllm import VLLMGenerator

    spec = tiny_spec("llama", llama64, backend="vllm")
    prompts = ["Question: What does dropout do?\nAnswer:", "Question: What is a convolution?\nAnswer:"]
    config = GenerationConfig(max_new_tokens=8, temperature=0.0)
    ours = VLLMGenerator(spec, gpu_memory_utilization=0.3)
    reference = TransformersGenerator(spec.model_copy(update={"backend": "transformers"}), device="cuda")
    got, want = ours.generate(prompts, config), reference.generate(prompts, config)
    assert [g.completion_tokens for g in got] and all(g.prompt_tokens == w.prompt_tokens for g, w in zip(got, want))
    assert sum(g.text == w.text for g, w in zip(got, want)) >= 1  # greedy on random weights: near-ties may differ
    beams = ours.generate(prompts, GenerationConfig(max_new_tokens=8, num_beams=2))
    assert len(beams) == 2 and all(b.completion_tokens <= 8 for b in beams)
