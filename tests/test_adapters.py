"""Adapters as live resources, on a tiny random Gemma 3: many LoRA adapters on one base, mixed in one
batch; loaded and unloaded on a running server (vLLM's endpoints) with every bad path refused and
nothing changed; trained, registered and scored through the REST API; and the shipped default.

Stand-in: `hold` wraps the real tiny generator's generate() so that it waits for the test, which
makes "a request is in flight while its adapter is unloaded" happen on demand."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from aimlqa.settings import UserError
from rag.answer import Answerer
from rag.generators.base import GenerationConfig
from rag.registry import ModelSpec
from tests.tiny import FAST, build_tiny, qa_rows, tiny_spec

PROMPTS = ["Question: What is dropout?\nAnswer:", "Question: What is a kernel?\nAnswer:", "Question: Why pool?\nAnswer:"]
GREEDY = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {f: build_tiny(f, root / f) for f in ("gemma3", "gpt2")}


def write_adapter(base_dir: Path, run_dir: Path, seed: int, targets=("q_proj", "v_proj", "down_proj"), base: str | None = None) -> Path:
    """What `aimlqa finetune` writes: run_dir/adapter (peft) + run_dir/manifest.json naming the base.
    lora_B is drawn at random (peft starts it at zero, which would leave the output unchanged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    torch.manual_seed(seed)
    for name, w in model.named_parameters():
        if "lora_B" in name:
            w.data.normal_(0, 0.5)
    model.save_pretrained(run_dir / "adapter")
    manifest = {"name": run_dir.name, "base": base or str(base_dir), "method": "lora (peft)", "recipe": {"name": "tiny-lora"}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny) -> Path:
    """An adapters directory with two good adapters for the tiny Gemma."""
    root = tmp_path_factory.mktemp("finetuned")
    write_adapter(tiny["gemma3"], root / "one", seed=1)
    write_adapter(tiny["gemma3"], root / "two", seed=2, targets=("k_proj", "o_proj", "up_proj"))
    return root


def gemma_spec(tiny, **fields) -> ModelSpec:
    return tiny_spec("gemma3", tiny["gemma3"], **fields)


def texts(gens) -> list[str]:
    return [g.text for g in gens]


# --- the generator: many adapters on one base ---------------------------------------------


def test_mixed_adapter_batch_equals_each_adapter_alone_and_unload_restores_the_base(tiny, root):
    from rag.generators.hf import StackedLoRA, TransformersGenerator, is_peft

    gen = TransformersGenerator(gemma_spec(tiny))
    base = texts(gen.generate(PROMPTS, GREEDY))
    gen.load_adapter("one", str(root / "one" / "adapter"))
    gen.load_adapter("two", str(root / "two" / "adapter"))
    one, two = texts(gen.generate(PROMPTS, GREEDY, ["one"] * 3)), texts(gen.generate(PROMPTS, GREEDY, ["two"] * 3))
    assert one != base and two != base and one != two  # each adapter changes the model, differently
    calls = []
    inner = gen.model.generate
    gen.model.generate = lambda *a, **kw: calls.append(kw) or inner(*a, **kw)
    mixed = texts(gen.generate(PROMPTS, GREEDY, ["one", None, "two"]))
    assert mixed == [one[0], base[1], two[2]]  # each row through its own adapter
    assert len(calls) == 1  # in one generate call, not one per adapter
    # peft's own mixed batches (where the stacked path cannot serve, e.g. DoRA) give the same answers
    gen._stacked, build = None, StackedLoRA.build
    StackedLoRA.build = classmethod(lambda cls, model, names: None)
    try:
        assert texts(gen.generate(PROMPTS, GREEDY, ["one", None, "two"])) == mixed
        assert calls[-1]["adapter_names"] == ["one", "__base__", "two"]
    finally:
        StackedLoRA.build = build
        del gen.model.generate
    # beam search repeats each row for its beams: the stacked path follows, as peft's does
    beams = GenerationConfig(max_new_tokens=6, num_beams=2)
    assert texts(gen.generate(PROMPTS, beams, ["two", "one", None])) == [texts(gen.generate([p], beams, [a]))[0] for p, a in zip(PROMPTS, ["two", "one", None])]
    assert texts(gen.generate(PROMPTS, GREEDY, [None] * 3)) == base
    with pytest.raises(UserError, match="'three' is not loaded; loaded: one, two"):
        gen.generate(PROMPTS[:1], GREEDY, ["three"])
    with pytest.raises(UserError, match="already loaded"):
        gen.load_adapter("one", str(root / "two" / "adapter"))
    gen.unload_adapter("one")
    assert texts(gen.generate(PROMPTS, GREEDY, ["two"] * 3)) == two
    gen.unload_adapter("two")
    assert not is_peft(gen.model) and gen.adapters == {}  # the base again, without LoRA layers
    assert texts(gen.generate(PROMPTS, GREEDY)) == base


def corrupt_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


@pytest.mark.parametrize("first", [True, False], ids=["into-the-bare-base", "beside-another-adapter"])
def test_a_failed_load_leaves_the_model_and_its_adapters_as_they_were(tiny, root, tmp_path, first):
    from rag.generators.hf import TransformersGenerator, is_peft

    gen = TransformersGenerator(gemma_spec(tiny))
    if not first:
        gen.load_adapter("one", str(root / "one" / "adapter"))
    before = texts(gen.generate(PROMPTS, GREEDY))
    gpt2 = write_adapter(tiny["gpt2"], tmp_path / "gpt2", seed=3, targets=("c_attn",))
    corrupt = corrupt_copy(root / "two", tmp_path / "corrupt")
    (tmp_path / "wide").mkdir()
    wide = build_tiny("gemma3", tmp_path / "wide-base", hidden_size=48)  # same module names, other sizes
    write_adapter(wide, tmp_path / "wide", seed=4)
    cases = [(gpt2, "does not have: it was trained on another base model"), (corrupt, "not a readable adapter"),
             (tmp_path / "wide", "48 in the adapter: it was trained on another base model"), (tmp_path / "none", "not a readable adapter")]
    for run, message in cases:
        with pytest.raises(UserError, match=message):
            gen.load_adapter("bad", str(run / "adapter"))
        assert list(gen.adapters) == ([] if first else ["one"]) and is_peft(gen.model) == (not first)
        assert texts(gen.generate(PROMPTS, GREEDY)) == before


# --- the server: load and unload while serving --------------------------------------------


def pool(tiny, retriever, *specs):
    from rag.pool import load_answerers

    return load_answerers([gemma_spec(tiny), *specs], retriever)


@pytest.fixture()
def served(tiny, root, retriever):
    """A fresh app per test: tiny-gemma3 (the base) and `one` (an adapter of it, from the registry)."""
    from server import ServerConfig, create_app

    answerers = pool(tiny, retriever, gemma_spec(tiny, name="one", adapter=str(root / "one" / "adapter")))
    app = create_app(answerers, config=ServerConfig(api_keys=frozenset(), adapters_root=root, max_wait_ms=200))
    with TestClient(app) as client:
        yield client, app, answerers


def served_ids(client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def ask(client, model, question="What is dropout?"):
    return client.post("/v1/answer", json={"question": question, "model": model, "rag": False, "max_new_tokens": 6})


def test_models_on_one_base_share_one_generator_and_one_batcher(served):
    client, app, answerers = served
    assert answerers["one"].generator is answerers["tiny-gemma3"].generator
    assert list(app.state.service.batchers) == ["tiny-gemma3"]
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["one"]["parent"] == answerers["tiny-gemma3"].spec.base and cards["tiny-gemma3"]["parent"] is None


def test_load_serves_at_once_and_unload_stops_it(served, root):
    client, app, answerers = served
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": "two"})
    assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
    assert served_ids(client) == ["tiny-gemma3", "one", "two"]
    got = ask(client, "two").json()
    gen = answerers["tiny-gemma3"].generator
    direct = Answerer(answerers["tiny-gemma3"].spec, generator=gen, adapter="two").answer("What is dropout?", rag=False, max_new_tokens=6)
    assert got["model"] == "two" and got["answer"] == direct.text
    assert got["answer"] != ask(client, "tiny-gemma3").json()["answer"]
    # an absolute path inside the root is as good as a relative one
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "two-again", "lora_path": str(root / "two" / "adapter")}).status_code == 200
    assert ask(client, "two-again").json()["answer"] == got["answer"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "two"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert "two" not in served_ids(client) and ask(client, "two").status_code == 404
    assert set(gen.adapters) == {"one", "two-again"}
    bad = client.post("/v1/unload_lora_adapter", json={"lora_name": "tiny-gemma3"})
    assert bad.status_code == 400 and "is a base model, not an adapter" in bad.json()["error"]["message"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "nothing"}).status_code == 404


def test_bad_adapter_requests_are_4xx_that_say_why_and_change_nothing(served, root, tiny, tmp_path):
    client, app, answerers = served
    elsewhere = write_adapter(tiny["gemma3"], tmp_path / "elsewhere", seed=5)
    (root / "escape").symlink_to(elsewhere, target_is_directory=True)
    write_adapter(tiny["gpt2"], root / "gpt2-run", seed=6, targets=("c_attn",))
    write_adapter(tiny["gpt2"], root / "liar", seed=7, targets=("c_attn",), base=answerers["tiny-gemma3"].spec.base)
    corrupt_copy(root / "two", root / "corrupt")
    (root / "no-manifest").mkdir()
    write_adapter(tiny["gemma3"], root / "no-manifest", seed=8)
    (root / "no-manifest" / "manifest.json").unlink()
    (root / "bad-json").mkdir()
    write_adapter(tiny["gemma3"], root / "bad-json", seed=9)
    (root / "bad-json" / "manifest.json").write_text("{not json")
    before_models = served_ids(client)
    before_answer = ask(client, "one").json()["answer"]
    cases = [
        ({"lora_name": "x", "lora_path": "../elsewhere"}, 403, "contains '..'"),
        ({"lora_name": "x", "lora_path": str(elsewhere)}, 403, "outside the adapters directory"),
        ({"lora_name": "x", "lora_path": "escape"}, 403, "outside the adapters directory"),
        ({"lora_name": "x", "lora_path": "gpt2-run"}, 400, f"trained on '{tiny['gpt2']}'; this server serves"),
        ({"lora_name": "x", "lora_path": "liar"}, 400, "trained on another base model"),
        ({"lora_name": "x", "lora_path": "corrupt"}, 400, "not a readable adapter"),
        ({"lora_name": "x", "lora_path": "no-manifest"}, 400, "has no manifest.json"),
        ({"lora_name": "x", "lora_path": "bad-json"}, 400, "manifest.json is not valid JSON"),
        ({"lora_name": "x", "lora_path": "missing"}, 404, "no such directory"),
        ({"lora_name": "x", "lora_path": "two\u0000"}, 400, "holds control characters"),
        ({"lora_name": "x", "lora_path": "two\udc80"}, 422, "lora_path: Input should be a valid string"),
        ({"lora_name": "one", "lora_path": "two"}, 409, "already served"),
        ({"lora_name": "tiny-gemma3", "lora_path": "two"}, 409, "already served"),
        ({"lora_name": "../x", "lora_path": "two"}, 422, "lora_name"),
        ({"lora_name": "x", "lora_path": "two", "lora_pth": "y"}, 422, "lora_pth: unknown field"),
    ]
    for body, status, message in cases:  # json.dumps escapes a lone surrogate, which httpx's json= cannot send
        r = client.post("/v1/load_lora_adapter", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
        assert served_ids(client) == before_models
    assert set(answerers["tiny-gemma3"].generator.adapters) == {"one"}
    assert ask(client, "one").json()["answer"] == before_answer  # the served adapter answers as before


def test_adapter_endpoints_need_the_api_key_when_keys_are_set(tiny, root, retriever):
    from server import ServerConfig, create_app

    app = create_app(pool(tiny, retriever), config=ServerConfig(api_keys=frozenset({"k1"}), adapters_root=root))
    with TestClient(app) as client:
        body = {"lora_name": "two", "lora_path": "two"}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 401
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "two"}).status_code == 401
        auth = {"Authorization": "Bearer k1"}
        assert client.post("/v1/load_lora_adapter", json=body, headers=auth).status_code == 200
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "two"}, headers=auth).status_code == 200


def hold(gen):
    """generate() waits for `release`; `entered` is set once a call is inside."""
    entered, release, inner = threading.Event(), threading.Event(), gen.generate

    def held(*a, **kw):
        entered.set()
        assert release.wait(30), "the test never released generate()"
        return inner(*a, **kw)

    gen.generate = held
    return entered, release


def test_a_request_in_flight_on_an_adapter_being_unloaded_finishes(served):
    client, app, answerers = served
    gen = answerers["tiny-gemma3"].generator
    entered, release = hold(gen)
    result, unloaded = {}, threading.Event()
    asking = threading.Thread(target=lambda: result.setdefault("r", ask(client, "one")))
    asking.start()
    assert entered.wait(10)
    unloading = threading.Thread(target=lambda: (client.post("/v1/unload_lora_adapter", json={"lora_name": "one"}), unloaded.set()))
    unloading.start()
    time.sleep(0.3)
    assert not unloaded.is_set() and "one" in gen.adapters  # waits for the request it would break
    release.set()
    asking.join(20), unloading.join(20)
    assert result["r"].status_code == 200 and result["r"].json()["model"] == "one"
    assert unloaded.is_set() and "one" not in gen.adapters and ask(client, "one").status_code == 404


def test_requests_for_different_adapters_and_the_base_share_one_forward_pass(served):
    client, app, answerers = served
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": "two"}).status_code == 200
    gen = answerers["tiny-gemma3"].generator
    alone = {m: ask(client, m).json()["answer"] for m in ("tiny-gemma3", "one", "two")}
    calls, inner = [], gen.generate
    gen.generate = lambda prompts, config, adapters=None: calls.append(list(adapters)) or inner(prompts, config, adapters)
    replies = {}
    threads = [threading.Thread(target=lambda m=m: replies.setdefault(m, ask(client, m).json())) for m in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and sorted(calls[0], key=str) == sorted(["one", "two", None], key=str)
    assert {m: r["answer"] for m, r in replies.items()} == alone and all(r["model"] == m for m, r in replies.items())


# --- the loop: train, register on a running server, score through it -------------------------


def test_train_register_and_score_through_the_server(tiny, retriever, tmp_path, aimlqa_home, qa_file, course_dir):
    from eval.ablation import run_ablation
    from eval.config import make_config
    from finetune.recipe import load_recipe
    from finetune.run import finetune
    from rag.cli import load_on_server
    from rag.registry import register
    from rag.remote import ServerClient
    from server import ServerConfig, create_app
    from server.local import live

    register("tiny-gemma3", family="gemma3", base=str(tiny["gemma3"]), context_window=256, max_new_tokens=8, dtype="float32")
    app = create_app(pool(tiny, retriever), config=ServerConfig(api_keys=frozenset()))
    with live(app) as url:
        recipe = load_recipe("gemma-270m-lora", FAST + ["lora.target_modules=[q_proj,v_proj]", "lora.top_layers=1", "model=tiny-gemma3"])
        out = aimlqa_home / "finetuned" / "tuned"
        m = finetune(recipe, [qa_rows(tmp_path)], out, name="tuned", progress=False)
        client = ServerClient(url)
        assert "is served on" in load_on_server(client, "tuned", out)
        assert [c["id"] for c in client.models()] == ["tiny-gemma3", "tuned"]
        assert "is served on" in load_on_server(client, "tuned", out, replace=True)  # a retrained adapter replaces it
        # aimlqa eval score --server URL -m tuned: the answers are the server's own
        config = make_config(name="score", models=["tuned"], rag=[True], top_k=[2], modes=["hybrid"], headline={"k": 2, "mode": "hybrid"},
                             datasets=[{"name": "qa", "path": qa_file, "split": "all"}], max_new_tokens=8, server=url,
                             corpus={"sources": [str(course_dir)], "dataset_split": None, "chunk_size": 64, "chunk_overlap": 8},
                             out=tmp_path / "eval")
        summary, out_dir = run_ablation(config, progress=False)
        rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
        direct = client.answer({"question": rows[0]["question"], "model": "tuned", "top_k": 2, "max_new_tokens": 8})
        assert summary["cells"][0]["model"] == "tuned" and summary["cells"][0]["n"] == 3
        assert rows[0]["prediction"] == direct["answer"] and rows[0]["sources"] == [s["section_id"] for s in direct["sources"]]
        assert any("REST API" in n for n in summary["notes"])
        with pytest.raises(UserError, match=r"none of the listed models is served by .* \(it serves tiny-gemma3, tuned\): nope"):
            run_ablation(config.model_copy(update={"models": ["nope"]}), progress=False)
        assert m["steps"] == 3


def test_the_adapters_command_lists_loads_and_explains_refusals(tiny, root, retriever, tmp_path):
    from server import ServerConfig, create_app
    from server.local import live

    app = create_app(pool(tiny, retriever), config=ServerConfig(api_keys=frozenset(), adapters_root=root))

    def aimlqa(*args):
        return subprocess.run([sys.executable, "-m", "aimlqa", "adapters", *args], capture_output=True, text=True, timeout=120)

    with live(app) as url:
        loaded = aimlqa("load", "two", str(root / "two"), "--server", url)
        assert loaded.returncode == 0 and "adapter 'two' is served on" in loaded.stdout, loaded.stderr
        listed = aimlqa("list", "--server", url)
        assert "two" in listed.stdout and "adapter on" in listed.stdout
        refused = aimlqa("load", "three", str(tmp_path), "--server", url)
        assert refused.returncode == 2 and "outside the adapters directory" in refused.stderr and "Traceback" not in refused.stderr
    gone = aimlqa("list", "--server", url)
    assert gone.returncode == 2 and "cannot reach the aimlqa server" in gone.stderr


# --- the shipped default ---------------------------------------------------------------------


def test_the_shipped_adapter_matches_its_manifest():
    from rag.registry import get_spec

    spec = get_spec("gemma-270m-aiml")
    adapter = Path(spec.adapter)
    manifest = json.loads((adapter.parent / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((adapter / name).read_bytes()).hexdigest() == digest, name
    assert manifest["base"] == spec.base == get_spec("gemma-270m").base
    assert manifest["final_metrics"]["eval_rougeL"] > 0.2 and "aimlqa finetune" in manifest["command"]
    assert (adapter / "adapter_model.safetensors").stat().st_size < 16 * 2**20
    # its export to llama.cpp is recorded, and is what these files export to
    from rag.gguf_lora import _adapter_pairs, lora_digest

    record = manifest["exports"]["llamacpp"]
    assert record["base"] == spec.base and record["digest"] == lora_digest(*_adapter_pairs(adapter, spec.family))


@pytest.mark.slow
def test_the_shipped_default_loads_and_answers(retriever):
    """The real Gemma 3 270M with the shipped adapter: it loads, changes the base's answer, and answers."""
    from rag.pool import load_answerers
    from rag.registry import get_spec

    answerers = load_answerers([get_spec("gemma-270m-aiml"), get_spec("gemma-270m")], retriever)
    question = "What does dropout do during training?"
    tuned = answerers["gemma-270m-aiml"].answer(question, k=2, max_new_tokens=32)
    assert tuned.model == "gemma-270m-aiml" and tuned.rag and len(tuned.sources) == 2 and len(tuned.text.split()) >= 3
    # ungrounded, the adapter is what answers: the base says something else
    plain = {m: answerers[m].answer(question, rag=False, max_new_tokens=24).text for m in answerers}
    assert plain["gemma-270m-aiml"] != plain["gemma-270m"] and "ropout" in plain["gemma-270m-aiml"]


def test_vllm_serves_many_adapters_with_a_lora_request_per_prompt(monkeypatch):
    # No GPU here: vLLM itself is faked (LLM, SamplingParams, LoRARequest, the engine's remove_lora);
    # what runs is our side, which must send each prompt its own adapter's request in one generate call.
    import types
    from collections import namedtuple

    from rag.generators import vllm as backend

    calls = {"generate": [], "removed": []}
    LoRARequest = namedtuple("LoRARequest", "lora_name lora_int_id lora_path")

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw
            self.llm_engine = types.SimpleNamespace(remove_lora=calls["removed"].append)

        def get_tokenizer(self):
            return lambda text: {"input_ids": text.split()}

        def generate(self, prompts, params, lora_request=None, use_tqdm=False):
            calls["generate"].append(lora_request)
            out = types.SimpleNamespace(text=" ok", token_ids=[1], finish_reason="stop")
            return [types.SimpleNamespace(prompt_token_ids=p.split(), outputs=[out]) for p in prompts]

    monkeypatch.setitem(sys.modules, "vllm.lora.request", types.SimpleNamespace(LoRARequest=LoRARequest))
    monkeypatch.setattr(backend, "require_vllm", lambda: types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    gen = backend.VLLMGenerator(tiny_spec("llama", "unused", backend="vllm", name="tuned", adapter="/adapters/tuned"))
    assert calls["llm"]["enable_lora"] is True  # always on, so adapters can be added while serving
    gen.load_adapter("other", "/adapters/other")
    with pytest.raises(UserError, match="already loaded"):
        gen.load_adapter("other", "/adapters/x")
    gen.generate(["a b", "c d", "e f"], GREEDY, ["tuned", None, "other"])
    assert [r and (r.lora_name, r.lora_int_id, r.lora_path) for r in calls["generate"][-1]] == [
        ("tuned", 1, "/adapters/tuned"), None, ("other", 2, "/adapters/other")]
    gen.generate(["a b"], GREEDY)  # a prompt without an adapter of its own: the entry's adapter
    assert calls["generate"][-1][0].lora_name == "tuned"
    gen.unload_adapter("other")
    assert calls["removed"] == [2] and gen.adapters == {"tuned": "/adapters/tuned"}
    with pytest.raises(UserError, match="'other' is not loaded"):
        gen.generate(["a b"], GREEDY, ["other"])


from tests.test_server import browser  # noqa: E402,F401  (the headless Chromium fixture)


def test_the_page_lists_an_adapter_loaded_live_and_drops_it_when_unloaded(browser, tiny, root, retriever):  # noqa: F811
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from server import ServerConfig, create_app
    from server.local import live

    app = create_app(pool(tiny, retriever), config=ServerConfig(api_keys=frozenset(), adapters_root=root))
    with live(app) as url:
        wait = WebDriverWait(browser, 60)  # a loaded CI machine answers slowly; the poll itself is timed below
        browser.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("data-loaded") == "true")
        options = lambda: [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
        assert options() == ["tiny-gemma3"]
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "two", "lora_path": "two"}).status_code == 200
        t0 = time.monotonic()
        wait.until(lambda d: options() == ["tiny-gemma3", "two"])  # no reload: the page polls /v1/models
        assert time.monotonic() - t0 < 7
        Select(browser.find_element(By.ID, "model")).select_by_value("two")
        browser.find_element(By.ID, "question").send_keys("What is dropout?")
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda d: "two," in d.find_element(By.ID, "meta").text)
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "two"}).status_code == 200
        wait.until(lambda d: options() == ["tiny-gemma3"])


def test_finetune_register_checks_the_server_before_training(tmp_path):
    """`--register URL` with no server there fails at once, before any model loads or trains."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "aimlqa", "finetune", "gemma-270m-lora", "--register", "http://127.0.0.1:9", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the aimlqa server at http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and time.monotonic() - t0 < 60
