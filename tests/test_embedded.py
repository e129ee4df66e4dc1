"""GGUF → safetensors conversion of the embedded default, with a tiny GGUF written by `gguf`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aimlqa.settings import UserError
from rag.embedded import convert_gguf, packaged_gguf, resolve_base
from tests.tiny_gguf import write_tiny_gemma3_gguf


def writer(calls: list | None = None):
    def write(work: Path) -> Path:
        if calls is not None:
            calls.append(work)
        work.mkdir(parents=True, exist_ok=True)
        return write_tiny_gemma3_gguf(work / "tiny.gguf")

    return write


def test_converted_model_matches_gguf_weights_and_answers(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from rag.answer import Answerer
    from rag.registry import ModelSpec

    calls = []
    out = convert_gguf(tmp_path / "cache" / "tiny", writer(calls))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file() and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".tiny.lock", "tiny"]  # no temp dirs left
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not getattr(model.config, "quantization_config", None)
    reader = gguf.GGUFReader(write_tiny_gemma3_gguf(tmp_path / "again.gguf"))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(model.get_input_embeddings().weight.shape)
    assert np.allclose(model.get_input_embeddings().weight.detach().numpy(), expected, atol=1e-6)
    assert convert_gguf(out, writer(calls)) == out and len(calls) == 1  # converted once
    spec = ModelSpec(name="tiny-gguf", family="gemma3", base=str(out), context_window=256, max_new_tokens=6)
    a = Answerer(spec).answer("what is dropout", rag=False)
    assert a.prompt_tokens > 0 and a.completion_tokens <= 6


def test_two_processes_convert_once(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pathlib import Path
        from rag.embedded import convert_gguf
        from tests.tiny_gguf import write_tiny_gemma3_gguf
        def write(work):
            with open({str(tmp_path / "calls")!r}, "a") as f:
                f.write("x")
            work.mkdir(parents=True, exist_ok=True)
            return write_tiny_gemma3_gguf(work / "tiny.gguf")
        print(convert_gguf(Path({str(tmp_path / "m")!r}), write))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert (tmp_path / "calls").read_text() == "x"
    assert {o[0].strip() for o in outs} == {str(tmp_path / "m")}


def test_resolve_base_uses_aimlqa_home(aimlqa_home, monkeypatch):
    import rag.embedded as embedded

    calls = []
    monkeypatch.setattr(embedded, "packaged_gguf", lambda package, work: writer(calls)(work))
    path = resolve_base("gguf:some-gguf-package")
    assert Path(path) == aimlqa_home / "models" / "some-gguf-package" and len(calls) == 1
    assert resolve_base("gguf:some-gguf-package") == path and len(calls) == 1
    assert resolve_base("gpt2") == "gpt2"


def test_missing_package_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not installed"):
        packaged_gguf("no-such-gguf-package", tmp_path)


def test_failed_conversion_leaves_nothing(tmp_path):
    def broken(work: Path) -> Path:
        work.mkdir(parents=True)
        (work / "bad.gguf").write_bytes(b"not a gguf")
        return work / "bad.gguf"

    with pytest.raises(Exception):
        convert_gguf(tmp_path / "m", broken)
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.tmp").exists()
