"""The llama.cpp back end on a tiny Gemma 3 GGUF written in a fixture: answers through the same
Answerer and prompts, streams, refuses what it cannot do with a message, and runs a LoRA adapter
exported to GGUF (llama.cpp itself checks every tensor's name and shape when it loads one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aimlqa.settings import UserError
from rag.generators.base import GenerationConfig
from rag.registry import ModelSpec
from tests.tiny_gguf import FFN, HEAD_DIM, HEADS, HIDDEN, LAYERS, write_tiny_gemma3_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")

PROMPT = "Question: What does dropout do?\nAnswer:"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", output_norm=1.0)


def spec(path, **over) -> ModelSpec:
    return ModelSpec(**dict(name="tiny-cpp", family="gemma3", base=str(path), backend="llamacpp", context_window=256, max_new_tokens=8) | over)


def lora_tensors(rank: int, scale: float, seed: int = 0) -> dict:
    """peft's names and shapes for every projection of the tiny model: A (r, in), B (out, r)."""
    rng = np.random.default_rng(seed)
    shapes = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (HEAD_DIM, HIDDEN), "self_attn.v_proj": (HEAD_DIM, HIDDEN),
              "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM), "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
    out = {}
    for i in range(LAYERS):
        for module, (rows, cols) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            out[f"{key}.lora_A.weight"] = rng.standard_normal((rank, cols)).astype(np.float32)
            out[f"{key}.lora_B.weight"] = (rng.standard_normal((rows, rank)) * scale).astype(np.float32)
    return out


def test_llamacpp_answers_streams_and_counts_like_the_other_back_ends(tiny_gguf, retriever):
    from rag.answer import Answerer
    from rag.generators import load_generator

    gen = load_generator(spec(tiny_gguf))
    assert gen.count_tokens("") == 0 and 0 < gen.count_tokens("dropout") < gen.count_tokens("dropout dropout")
    config = GenerationConfig(max_new_tokens=6)
    whole = gen.generate([PROMPT, PROMPT + " It"], config)
    assert len(whole) == 2 and all(0 < g.completion_tokens <= 6 and g.prompt_tokens > gen.count_tokens(PROMPT) - 1 for g in whole)
    assert gen.generate([PROMPT], config)[0].text == whole[0].text  # greedy: the same every time
    seen = []
    streamed = gen.generate([PROMPT], config, sinks=[seen.append])[0]
    assert streamed.text == whole[0].text and seen[-1] == streamed.text and len(seen) >= 2
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # each call sees the text so far
    with pytest.raises(UserError, match="llama.cpp, which has no beam search.*num_beams 1"):
        gen.generate([PROMPT], GenerationConfig(max_new_tokens=4, num_beams=2))
    # behind the same Answerer: retrieval, the prompt template, cleaning, attribution
    answer = Answerer(spec(tiny_gguf), retriever, generator=gen).answer("How does dropout reduce overfitting?", k=1, abstain=False)
    assert answer.rag and len(answer.sources) == 1 and answer.attribution is not None
    assert answer.prompt_tokens > gen.count_tokens(answer.sources[0].text)  # the passage is in the prompt


def test_greedy_prompts_of_a_batch_are_decoded_together_and_stream(tiny_gguf):
    from rag.generators import load_generator

    gen = load_generator(spec(tiny_gguf))
    prompts = [PROMPT, "Question: What is a kernel?\nAnswer:", "Question: How big is the output?\nAnswer:"]
    config = GenerationConfig(max_new_tokens=6)
    alone = [gen._one(p, config, None) for p in prompts]  # llama.cpp's own completion loop, one prompt at a time
    seen = [[] for _ in prompts]
    together = gen.generate(prompts, config, sinks=[s.append for s in seen])
    assert gen._batched is not None and gen._batched.n_seq >= len(prompts)  # the batched context was used
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.completion_tokens for g in together] == [g.completion_tokens for g in alone]
    assert all(s and s[-1] == g.text for s, g in zip(seen, together))
    # prompts longer together than one prefill chunk (512 tokens): each still gets its own answer
    long = [p * 6 for p in prompts]
    wide = load_generator(spec(tiny_gguf, context_window=512))
    assert sum(wide.count_tokens(p) for p in long) > 512
    first = GenerationConfig(max_new_tokens=1)  # the first token depends on the prefill alone
    assert [g.text for g in wide.generate(long, first)] == [wide._one(p, first, None).text for p in long]
    assert all(g.completion_tokens > 0 for g in wide.generate(long, config))
    # sampling is not batched: one prompt after another, each with llama.cpp's sampler
    sampled = gen.generate(prompts, GenerationConfig(max_new_tokens=4, temperature=0.7, seed=1))
    assert len(sampled) == 3 and all(g.completion_tokens <= 4 for g in sampled)


def test_a_missing_gguf_or_back_end_says_what_to_do(tmp_path, monkeypatch):
    from rag.generators import load_generator

    with pytest.raises(UserError, match="needs a GGUF model file"):
        load_generator(spec(tmp_path / "model.safetensors"))
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if it had not been built
    with pytest.raises(UserError, match="needs llama-cpp-python.*make install"):
        load_generator(spec(tmp_path / "x.gguf"))


def test_an_exported_lora_adapter_changes_the_answer_and_a_zero_one_does_not(tiny_gguf, tmp_path):
    from rag.generators.llamacpp import LlamaCppGenerator
    from rag.gguf_lora import export_lora

    config = GenerationConfig(max_new_tokens=8)
    base = LlamaCppGenerator(spec(tiny_gguf)).generate([PROMPT], config)[0].text
    assert base  # the tiny model says something, so a change would show

    def with_adapter(scale: float, name: str) -> str:
        path = export_lora(lora_tensors(4, scale), {"r": 4, "lora_alpha": 8}, tmp_path / f"{name}.gguf")
        gen = LlamaCppGenerator(spec(tiny_gguf))
        gen.llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, lora_path=str(path), seed=0, verbose=False)
        return gen.generate([PROMPT], config)[0].text

    assert with_adapter(0.0, "zero") == base  # B = 0: the adapter adds nothing
    assert with_adapter(3.0, "strong") != base
    with pytest.raises(UserError, match="DoRA"):
        export_lora(lora_tensors(4, 1.0), {"r": 4, "lora_alpha": 8, "use_dora": True}, tmp_path / "dora.gguf")
    with pytest.raises(UserError, match="no llama.cpp counterpart"):
        export_lora({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 8), np.float32)}, {"r": 4, "lora_alpha": 8}, tmp_path / "head.gguf")
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left behind


def test_a_shipped_adapter_records_its_export_and_a_changed_one_is_refused(tiny_gguf, tmp_path, monkeypatch):
    import json

    from safetensors.numpy import save_file

    from rag.gguf_lora import adapter_gguf, record_export

    monkeypatch.setenv("AIMLQA_HOME", str(tmp_path / "home"))
    root = tmp_path / "tiny-aiml"
    (root / "adapter").mkdir(parents=True)
    save_file(lora_tensors(4, 1.0), str(root / "adapter" / "adapter_model.safetensors"))
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (root / "manifest.json").write_text(json.dumps({"base": str(tiny_gguf), "recipe": {"model": "gemma-270m"}, "files": {}}))
    record = record_export(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["exports"]["llamacpp"] == record and manifest["files"] == {}  # added, nothing else touched
    assert record["tensors"] == 2 * 7 * LAYERS and record["alpha"] == 8.0 and record["file_bytes"] > 0
    exported = adapter_gguf(root / "adapter", str(tiny_gguf))
    assert llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=64, lora_path=str(exported), verbose=False)  # llama.cpp takes it
    # the adapter's weights changed after it was recorded: its export no longer matches; refused
    save_file(lora_tensors(4, 2.0), str(root / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="differs from the one its manifest records.*python -m rag.gguf_lora"):
        adapter_gguf(root / "adapter", str(tiny_gguf))
    # the remedy it names works: re-recording exports the changed adapter, which is then served
    assert record_export(root)["digest"] != record["digest"]
    assert adapter_gguf(root / "adapter", str(tiny_gguf)) != exported


def test_a_model_requantised_to_q8_0_loads_and_answers(tiny_gguf, tmp_path):
    import shutil

    from rag.gguf_lora import requantized
    from rag.generators.llamacpp import LlamaCppGenerator

    model = Path(shutil.copy(tiny_gguf, tmp_path / "tiny.gguf"))
    q8 = requantized(model, "Q8_0")
    assert q8.is_file() and q8 != model and requantized(model, "Q8_0") == q8  # built once
    assert q8.stat().st_size < model.stat().st_size  # float32 layers became 8-bit
    # a registry entry asks for it with `quantize`: the generator serves the re-quantised file
    served = LlamaCppGenerator(spec(model, quantize="Q8_0"))
    assert served.llm.model_path == str(q8) and served.generate([PROMPT], GenerationConfig(max_new_tokens=4))[0].completion_tokens > 0
    with pytest.raises(UserError, match="unknown quantization 'Q3'"):
        requantized(model, "Q3")
    with pytest.raises(ValueError, match="quantize Q8_0 is for backend: llamacpp"):
        spec(model, quantize="Q8_0", backend="transformers")


def test_the_default_is_llamacpp_when_it_is_built_and_transformers_otherwise(monkeypatch):
    import importlib.util

    from aimlqa import settings
    from rag.registry import get_spec

    assert settings.default_model() == "gemma-270m-aiml-cpp" and get_spec(settings.default_model()).backend == "llamacpp"
    assert settings.default_models() == ["gemma-270m-aiml-cpp", "gemma-270m-aiml", "gemma-270m"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert settings.default_model() == "gemma-270m-aiml" and settings.default_models() == ["gemma-270m-aiml", "gemma-270m"]
    # the same adapter on both back ends
    assert get_spec("gemma-270m-aiml-cpp").adapter == get_spec("gemma-270m-aiml").adapter
