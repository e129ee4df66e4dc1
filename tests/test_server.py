"""The REST service on a tiny random GPT-2 and the small test index: every endpoint, every error,
batching, the queue bound, time-outs, auth, the official `openai` client, schemathesis, the page
in headless Chromium, and `aimlqa serve` itself.

Stand-ins, each for what cannot be made to happen here on demand: `Gate` wraps the real tiny
generator and holds generate() until a test releases it (so queueing and time-outs are
deterministic); its `fail_when` raises from generate() (a real CUDA out-of-memory cannot happen
on this CPU); and one test makes /readyz's index lookup raise, to check the catch-all 500."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from rag.answer import Answerer
from rag.registry import ModelSpec
from server import ServerConfig, create_app
from server.local import free_port, live, wait_ready
from tests.tiny import build_tiny, tiny_spec

TINY = "tiny-gpt2"
QUESTION = "How does dropout reduce overfitting?"
OPEN = frozenset()  # no API keys


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny("gpt2", tmp_path_factory.mktemp("tiny") / "gpt2")


@pytest.fixture(scope="module")
def answerers(tiny_gpt2, retriever) -> dict:
    retrieval = ModelSpec(name="retrieval-only", family="none", backend="retrieval")
    return {TINY: Answerer(tiny_spec("gpt2", tiny_gpt2), retriever), "retrieval-only": Answerer(retrieval, retriever)}


@pytest.fixture(scope="module")
def app(answerers):
    return create_app(answerers, config=ServerConfig(api_keys=OPEN))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def live_url(answerers):
    """A second app on the same models: an app's batchers live on one event loop, TestClient's or uvicorn's."""
    with live(create_app(answerers, config=ServerConfig(api_keys=OPEN))) as url:
        yield url


class Gate:
    """The real tiny generator behind a gate: generate() waits until the test opens it, and the
    size of every batch is recorded. `fail_when(prompts)` makes generate() raise instead."""

    def __init__(self, inner, fail_when=None, open_=False):
        self.inner, self.fail_when = inner, fail_when
        self.context_window = inner.context_window
        self.open, self.entered, self.sizes = threading.Event(), threading.Event(), []
        if open_:
            self.open.set()

    def count_tokens(self, text):
        return self.inner.count_tokens(text)

    def generate(self, prompts, config):
        self.sizes.append(len(prompts))
        self.entered.set()
        assert self.open.wait(30), "the test never opened the gate"
        if self.fail_when and self.fail_when(prompts):
            raise RuntimeError("CUDA out of memory at /secret/weights/path")
        return self.inner.generate(prompts, config)


def gated_app(answerers, gate, **config):
    tiny = answerers[TINY]
    return create_app({TINY: Answerer(tiny.spec, tiny.retriever, generator=gate)}, config=ServerConfig(api_keys=OPEN, **config))


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def error_of(response) -> dict:
    """The error body, checked to carry the same request id as the response header."""
    err = response.json()["error"]
    assert err["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return err


def ask(client_or_url, body, method="POST", path="/v1/answer", **kw):
    if isinstance(client_or_url, str):
        return httpx.request(method, client_or_url + path, json=body, timeout=60, **kw)
    return client_or_url.request(method, path, json=body, **kw)


# --- answers ------------------------------------------------------------------------------


def test_answer_with_sources_matches_the_answerer(client, answerers):
    r = ask(client, {"question": QUESTION, "model": TINY, "top_k": 2})
    assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    body = r.json()
    assert set(body) == {"answer", "cited_answer", "sentences", "support", "relevance", "abstained", "raw_answer", "sources", "model", "rag", "usage", "timings"}
    assert body["model"] == TINY and body["rag"] is True and len(body["sources"]) == 2
    assert all(set(s) == {"text", "source", "section", "section_id", "score", "chunk_id"} for s in body["sources"])
    scores = [s["score"] for s in body["sources"]]
    assert scores == sorted(scores, reverse=True)
    assert "dropout" in body["sources"][0]["text"].lower()
    direct = answerers[TINY].answer(QUESTION, rag=True, k=2)
    assert body["answer"] == direct.text and body["usage"]["prompt_tokens"] == direct.prompt_tokens
    assert [s["section_id"] for s in body["sources"]] == [s.section_id for s in direct.sources]  # the CLI's citation ids
    assert all(re.fullmatch(r"[\w.-]+(/[\w.-]+)*#[\w.-]+", s["section_id"]) for s in body["sources"]), body["sources"]
    assert set(body["timings"]) == {"retrieve_ms", "generate_ms", "attribute_ms", "queue_ms"} and body["timings"]["generate_ms"] > 0

    beams = ask(client, {"question": QUESTION, "model": TINY, "top_k": 2, "num_beams": 3, "max_new_tokens": 6}).json()
    assert beams["answer"] == answerers[TINY].answer(QUESTION, rag=True, k=2, num_beams=3, max_new_tokens=6).text
    assert beams["answer"] != answerers[TINY].answer(QUESTION, rag=True, k=2, max_new_tokens=6).text  # greedy differs here

    plain = ask(client, {"question": QUESTION, "model": TINY, "rag": False, "max_new_tokens": 3}).json()
    assert plain["rag"] is False and plain["sources"] == [] and plain["timings"]["retrieve_ms"] == 0
    assert plain["usage"]["prompt_tokens"] < body["usage"]["prompt_tokens"] and plain["usage"]["completion_tokens"] <= 3


def test_default_model_and_retrieval_only(client, answerers):
    default = ask(client, {"question": QUESTION}).json()
    assert default["model"] == TINY and len(default["sources"]) == 3  # the first served model, top_k 3
    floor = ask(client, {"question": QUESTION, "model": "retrieval-only", "top_k": 1}).json()
    assert floor["answer"] == answerers["retrieval-only"].answer(QUESTION, k=1).text != ""
    assert floor["usage"] == {"prompt_tokens": 0, "completion_tokens": 0} and len(floor["sources"]) == 1


def test_models_health_ready(client, retriever):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["backend"]) for m in models["data"]] == [(TINY, "transformers"), ("retrieval-only", "retrieval")]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["index"]["chunks"] == len(retriever.chunks) and ready.json()["models"] == [TINY, "retrieval-only"]


def test_seed_get_with_a_body_answers_and_a_browser_gets_the_page(client):
    seed = client.request("GET", "/", json={"question": QUESTION})
    assert seed.status_code == 200
    assert seed.json() == ask(client, {"question": QUESTION}).json()["answer"]  # the answer string, grounded, k=3
    hub_id = client.request("GET", "/", json={"question": QUESTION, "model_name": "anukvma/bart-aiml-question-answer-v2"})
    assert hub_id.status_code == 404 and "unknown model 'anukvma/bart-aiml-question-answer-v2'" in error_of(hub_id)["message"]
    assert client.request("GET", "/", content=b"{not json").status_code == 422

    page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="question"', 'id="model"', 'id="rag"', 'id="answer"', 'id="sources"'):
        assert element in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text), "the page must not load from a CDN"
    assert "default-src 'none'" in page.headers["content-security-policy"]


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"question": ""}, 422, "question: String should have at least 1 character"),
        ({"question": "   \n"}, 422, "question: question is empty"),
        ({"question": "x" * 2001}, 422, "question: String should have at most 2000 characters"),
        ({}, 422, "question: Field required"),
        ({"question": QUESTION, "top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
        ({"question": QUESTION, "top_k": 21}, 422, "top_k: Input should be less than or equal to 20"),
        ({"question": QUESTION, "max_new_tokens": 0}, 422, "max_new_tokens: Input should be greater than or equal to 1"),
        ({"question": QUESTION, "max_new_tokens": 5000}, 422, "max_new_tokens: Input should be less than or equal to 1024"),
        ({"question": QUESTION, "max_new_tokens": 300}, 400, "max_new_tokens=300 does not fit tiny-gpt2's context window of 256"),
        ({"question": QUESTION, "temperature": 2.5}, 422, "temperature: Input should be less than or equal to 2"),
        ({"question": QUESTION, "temperature": 1e-170}, 422, "temperature: temperature must be 0 (greedy) or at least 0.01"),
        ({"question": QUESTION, "num_beams": 9}, 422, "num_beams: Input should be less than or equal to 8"),
        ({"question": QUESTION, "num_beams": 2, "temperature": 0.7}, 422, "num_beams=2 is beam search, which does not sample"),
        ({"question": QUESTION, "topk": 2}, 422, "topk: unknown field; known: abstain, max_new_tokens, model, num_beams, question, rag, temperature, top_k"),
        ({"question": QUESTION, "model": "gpt-4"}, 404, "unknown model 'gpt-4'; this server serves: tiny-gpt2, retrieval-only"),
        ({"question": QUESTION, "model": "/tmp/some/model/dir"}, 404, "unknown model '/tmp/some/model/dir'"),
    ],
)
def test_bad_requests_say_what_was_wrong(client, body, status, message):
    r = ask(client, body)
    assert r.status_code == status, r.text
    assert message in error_of(r)["message"]


@pytest.mark.parametrize("path, raw", [
    ("/v1/answer", r'{"question": "what is \ud800 dropout"}'),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "what is \udc00 dropout"}]}'),
])
def test_a_question_that_is_not_unicode_text_is_refused(client, path, raw):
    r = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "valid" in error_of(r)["message"]


def test_question_over_the_token_limits(answerers):
    with TestClient(create_app(answerers, config=ServerConfig(api_keys=OPEN, max_question_tokens=20))) as c:
        long = " ".join(["dropout"] * 30)
        r = ask(c, {"question": long, "model": TINY})
        assert r.status_code == 400 and re.search(r"the question is \d+ tokens long; the limit is 20", error_of(r)["message"])
        assert ask(c, {"question": long, "model": "retrieval-only"}).status_code == 200  # no generator, no token limit
        assert ask(c, {"question": "What is dropout?", "model": TINY}).status_code == 200
    with TestClient(create_app(answerers, config=ServerConfig(api_keys=OPEN, max_question_tokens=1000))) as c:
        r = ask(c, {"question": " ".join(["convolution kernels"] * 60), "model": TINY, "max_new_tokens": 200})
        assert r.status_code == 400 and "do not fit tiny-gpt2's context window of 256 tokens" in error_of(r)["message"]


def test_unknown_route_and_method(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["message"] == "no such endpoint: GET /v2/nothing"
    r = client.get("/v1/answer")
    assert r.status_code == 405 and "GET is not allowed" in error_of(r)["message"]


# --- OpenAI compatibility -----------------------------------------------------------------


def test_openai_client_plain_streaming_and_errors(answerers):
    import openai

    with live(create_app(answerers, config=ServerConfig(api_keys=frozenset({"k1"})))) as url:
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in oai.models.list()] == [TINY, "retrieval-only"]
        messages = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": QUESTION}]
        grounded = oai.chat.completions.create(model=TINY, messages=messages)
        expected = httpx.post(f"{url}/v1/answer", json={"question": QUESTION, "model": TINY}, headers={"Authorization": "Bearer k1"}).json()
        assert grounded.choices[0].message.content == expected["cited_answer"] and grounded.choices[0].message.role == "assistant"
        assert grounded.choices[0].finish_reason in ("stop", "length") and grounded.object == "chat.completion"
        assert grounded.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert grounded.usage.total_tokens == grounded.usage.prompt_tokens + grounded.usage.completion_tokens
        assert len(grounded.model_extra["sources"]) == 3  # grounded by default

        plain = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=4, extra_body={"rag": False})
        assert plain.model_extra["sources"] == [] and plain.usage.prompt_tokens < grounded.usage.prompt_tokens
        assert plain.usage.completion_tokens <= 4
        one = oai.chat.completions.create(model=TINY, messages=messages, extra_body={"top_k": 1})
        assert len(one.model_extra["sources"]) == 1

        stream = oai.chat.completions.create(model=TINY, messages=messages, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == grounded.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [grounded.choices[0].finish_reason]
        assert chunks[-1].usage.total_tokens == grounded.usage.total_tokens

        with pytest.raises(openai.NotFoundError, match="unknown model 'gpt-4o'"):
            oai.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.UnprocessableEntityError, match="need a user message"):
            oai.chat.completions.create(model=TINY, messages=[{"role": "system", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_content_parts_and_last_user_message(client):
    body = {"model": "retrieval-only", "messages": [
        {"role": "user", "content": "What is a convolution kernel?"},
        {"role": "assistant", "content": "..."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == ask(client, {"question": QUESTION, "model": "retrieval-only"}).json()["cited_answer"]
    assert client.post("/v1/chat/completions", json=body | {"n": 2}).status_code == 422


# --- auth ---------------------------------------------------------------------------------


def test_api_keys(answerers):
    with TestClient(create_app(answerers, config=ServerConfig(api_keys=frozenset({"s3cret", "other"})))) as c:
        body = {"question": QUESTION, "model": "retrieval-only"}
        missing = ask(c, body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in error_of(missing)["message"]
        assert ask(c, body, headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert ask(c, body, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert ask(c, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert ask(c, body, headers={"Authorization": "Bearer other"}).status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert c.get(path).status_code == 401 and c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
        assert c.request("GET", "/", json={"question": QUESTION}).status_code == 401
        for path in ("/healthz", "/readyz", "/"):  # health and the page (which asks for the key) stay open
            assert c.get(path).status_code == 200


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("AIMLQA_API_KEYS", " a1 , b2,,")
    assert ServerConfig().api_keys == {"a1", "b2"}
    monkeypatch.delenv("AIMLQA_API_KEYS")
    assert ServerConfig().api_keys == frozenset()


# --- batching, the queue bound, time-outs, failures ---------------------------------------


def test_batcher_waits_at_most_max_wait_and_runs_a_full_batch_at_once():
    from server.batching import Batcher

    async def scenario():
        calls = []
        batcher = Batcher(lambda qs, key: calls.append(list(qs)) or [q.upper() for q in qs], max_batch_size=2, max_wait_s=0.3)
        batcher.start()
        t0 = time.monotonic()
        alone = await batcher.submit("a", "k").future
        waited = time.monotonic() - t0
        t0 = time.monotonic()
        pair = await asyncio.gather(batcher.submit("b", "k").future, batcher.submit("c", "k").future)
        full = time.monotonic() - t0
        mixed = await asyncio.gather(*(batcher.submit(q, key).future for q, key in [("d", "k"), ("e", "other"), ("f", "k")]))
        await batcher.stop()
        return alone, waited, pair, full, mixed, calls

    alone, waited, pair, full, mixed, calls = asyncio.run(scenario())
    assert alone == "A" and 0.28 <= waited < 1.5  # a lone request waits for company, then goes
    assert pair == ["B", "C"] and full < 0.25  # a full batch does not wait
    assert mixed == ["D", "E", "F"] and calls[2:] == [["d", "f"], ["e"]]  # only compatible requests share a call


def test_batcher_survives_a_bug_in_its_own_bookkeeping():
    from server.batching import Batcher

    async def scenario():
        broken = {"on": True}

        def on_batch(size, seconds):
            if broken.pop("on", False):
                raise ValueError("metrics bug")

        batcher = Batcher(lambda qs, key: list(qs), max_wait_s=0, on_batch=on_batch)
        batcher.start()
        with pytest.raises(ValueError, match="metrics bug"):
            await batcher.submit("a", "k").future
        after = await asyncio.wait_for(batcher.submit("b", "k").future, 5)
        await batcher.stop()
        return after

    assert asyncio.run(scenario()) == "b"


def test_concurrent_compatible_requests_share_one_generate_call(answerers):
    gate = Gate(answerers[TINY].generator)
    app = gated_app(answerers, gate, max_batch_size=3, max_wait_ms=20)
    with live(app) as url, ThreadPoolExecutor(8) as pool:
        batcher = app.state.service.batchers[TINY]
        try:
            first = pool.submit(ask, url, {"question": "What is a kernel?", "model": TINY, "rag": False})
            assert gate.entered.wait(10)
            same = [pool.submit(ask, url, {"question": QUESTION, "model": TINY, "max_new_tokens": 6}) for _ in range(3)]
            other = pool.submit(ask, url, {"question": QUESTION, "model": TINY, "max_new_tokens": 6, "temperature": 0.7})
            wait_for(lambda: batcher.depth == 4)
        finally:
            gate.open.set()
        results = [f.result() for f in (first, *same, other)]
        assert [r.status_code for r in results] == [200] * 5
        assert gate.sizes[0] == 1 and sorted(gate.sizes[1:]) == [1, 3]  # the three alike together, the sampled one alone
        texts = {r.json()["answer"] for r in results[1:4]}
        assert len(texts) == 1
        assert all(r.json()["timings"]["queue_ms"] > 0 for r in results[1:])
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "aimlqa_batch_size_count", model=TINY) == 3 and metric(text, "aimlqa_batch_size_sum", model=TINY) == 5
        assert metric(text, "aimlqa_queue_depth", model=TINY) == 0


def test_a_full_queue_answers_503_with_retry_after(answerers):
    gate = Gate(answerers[TINY].generator)
    app = gated_app(answerers, gate, max_batch_size=1, queue_size=1, max_wait_ms=0)
    body = {"question": QUESTION, "model": TINY, "max_new_tokens": 4}
    with live(app) as url, ThreadPoolExecutor(4) as pool:
        try:
            running = pool.submit(ask, url, body)
            assert gate.entered.wait(10)
            waiting = pool.submit(ask, url, body)
            wait_for(lambda: app.state.service.batchers[TINY].depth == 1)
            refused = ask(url, body)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert error_of(refused)["code"] == "queue_full" and "requests waiting" in error_of(refused)["message"]
        finally:
            gate.open.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert ask(url, body).status_code == 200  # room again once the queue drains
        assert metric(httpx.get(f"{url}/metrics").text, "aimlqa_refused_total", model=TINY, reason="queue_full") == 1


def test_a_slow_request_answers_504_and_the_server_recovers(answerers):
    gate = Gate(answerers[TINY].generator)
    app = gated_app(answerers, gate, max_batch_size=1, max_wait_ms=0, request_timeout_s=0.5)
    body = {"question": QUESTION, "model": TINY, "max_new_tokens": 4}
    with live(app) as url, ThreadPoolExecutor(4) as pool:
        try:
            running = pool.submit(ask, url, body)
            assert gate.entered.wait(10)
            queued = pool.submit(ask, url, body)
            t0 = time.monotonic()
            for r in (running.result(), queued.result()):
                assert r.status_code == 504 and "no answer within the 0.5 s limit" in error_of(r)["message"]
            assert time.monotonic() - t0 < 3
            assert app.state.service.batchers[TINY].depth == 0  # the one that gave up waiting left the queue
        finally:
            gate.open.set()
        assert ask(url, body).status_code == 200
        assert gate.sizes == [1, 1]  # the timed-out waiter never reached the model
        assert metric(httpx.get(f"{url}/metrics").text, "aimlqa_refused_total", model=TINY, reason="timeout") == 2


def test_a_generation_failure_is_a_500_with_a_request_id_and_the_trace_in_the_log(answerers, caplog):
    gate = Gate(answerers[TINY].generator, fail_when=lambda prompts: any("poison" in p for p in prompts), open_=True)
    with TestClient(gated_app(answerers, gate)) as c:
        r = ask(c, {"question": "poison question", "model": TINY}, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
    err = error_of(r)
    assert err["code"] == "generation_failed" and "req-42" in err["message"]
    assert "CUDA" not in r.text and "/secret" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if "req-42" in rec.getMessage()]
    assert logged and logged[0].exc_info and "CUDA out of memory" in str(logged[0].exc_info[1])


def test_a_failing_request_does_not_fail_the_rest_of_its_batch(answerers):
    gate = Gate(answerers[TINY].generator, fail_when=lambda prompts: any("poison" in p for p in prompts))
    app = gated_app(answerers, gate, max_batch_size=4, max_wait_ms=20)
    with live(app) as url, ThreadPoolExecutor(4) as pool:
        try:
            blocker = pool.submit(ask, url, {"question": "What is a kernel?", "model": TINY, "rag": False})
            assert gate.entered.wait(10)
            good = pool.submit(ask, url, {"question": QUESTION, "model": TINY, "max_new_tokens": 4})
            bad = pool.submit(ask, url, {"question": "poison question", "model": TINY, "max_new_tokens": 4})
            wait_for(lambda: app.state.service.batchers[TINY].depth == 2)
        finally:
            gate.open.set()
        assert blocker.result().status_code == 200
        assert good.result().status_code == 200 and bad.result().status_code == 500
        assert gate.sizes == [1, 2, 1, 1]  # the failed pair was re-run one by one


def test_a_bug_outside_generation_is_a_json_500(answerers, monkeypatch):
    app = create_app(answerers, config=ServerConfig(api_keys=OPEN))
    with TestClient(app) as c:
        monkeypatch.setattr(app.state.service, "index_info", lambda: 1 / 0)
        r = c.get("/readyz")
    assert r.status_code == 500 and error_of(r)["code"] == "internal_error" and "ZeroDivision" not in r.text


# --- loading and readiness ----------------------------------------------------------------


def test_ready_only_once_the_background_load_finishes(answerers):
    release = threading.Event()

    def loader():
        assert release.wait(10)
        return {"retrieval-only": answerers["retrieval-only"]}

    with TestClient(create_app(loader=loader, config=ServerConfig(api_keys=OPEN))) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["status"] == "loading"
        early = ask(c, {"question": QUESTION})
        assert early.status_code == 503 and early.headers["retry-after"] and "still loading" in error_of(early)["message"]
        release.set()
        wait_for(lambda: c.get("/readyz").status_code == 200)
        assert ask(c, {"question": QUESTION}).json()["model"] == "retrieval-only"


def test_a_failed_load_is_reported(answerers):
    from aimlqa.settings import UserError

    def loader():
        raise UserError("model 'mistral-7b' is a 4-bit checkpoint and needs a CUDA GPU")

    seen = []
    with TestClient(create_app(loader=loader, config=ServerConfig(api_keys=OPEN), on_load_error=seen.append)) as c:
        wait_for(lambda: c.get("/readyz").json()["status"] == "failed")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "needs a CUDA GPU" in ready.json()["error"]
        assert "needs a CUDA GPU" in error_of(ask(c, {"question": QUESTION}))["message"]
    assert seen == ["model 'mistral-7b' is a 4-bit checkpoint and needs a CUDA GPU"]


# --- metrics ------------------------------------------------------------------------------


def test_metrics_count_requests_latency_and_tokens(client):
    before = client.get("/metrics").text
    answer = ask(client, {"question": QUESTION, "model": TINY}).json()
    ask(client, {"question": ""})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    delta = lambda name, **labels: metric(text, name, **labels) - metric(before, name, **labels)
    assert delta("aimlqa_requests_total", route="/v1/answer", method="POST", status="200") == 1
    assert delta("aimlqa_requests_total", route="/v1/answer", method="POST", status="422") == 1
    assert delta("aimlqa_request_latency_seconds_count", route="/v1/answer") == 2
    assert delta("aimlqa_tokens_total", model=TINY, kind="prompt") == answer["usage"]["prompt_tokens"]
    assert delta("aimlqa_tokens_total", model=TINY, kind="completion") == answer["usage"]["completion_tokens"]
    assert "aimlqa_queue_depth" in text and "aimlqa_batch_seconds_bucket" in text


# --- property-based: schemathesis against /openapi.json -----------------------------------


@pytest.mark.parametrize("mode, examples", [("positive", 15), ("negative", 10)])
def test_openapi_property_based_no_server_errors(live_url, mode, examples):
    """Generated requests for every operation in the published schema: never a 5xx, and every
    response is one the schema documents. (Driven with hypothesis directly: schemathesis' pytest
    loader reads a pytest-internal attribute that pytest 9 no longer has.)"""
    import schemathesis
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/answer", "POST /v1/chat/completions", "GET /v1/models", "GET /metrics", "GET /readyz"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    for op in operations:
        if mode == "negative" and not len(op.body):
            continue  # nothing to make invalid in a request without a body
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        def run(case):
            case.call_and_validate(checks=checks, timeout=60)

        run()


def test_streamed_chat_conforms_to_published_schema(live_url):
    """A stream: true chat response validates, event by event, against the schema /openapi.json
    publishes for it (the random examples above reach streaming only by chance)."""
    import schemathesis
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    op = schema["/v1/chat/completions"]["POST"]
    case = op.Case(body={"model": TINY, "messages": [{"role": "user", "content": "What is overfitting?"}], "stream": True, "max_tokens": 8})
    response = case.call_and_validate(checks=[content_type_conformance, response_schema_conformance], timeout=60)
    assert response.headers["content-type"][0].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


# --- the page in headless Chromium --------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def page_ask(browser, wait, model: str, rag: bool):
    """Ask QUESTION on the page with this model and retrieval setting; the #answer element once done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    box = browser.find_element(By.ID, "rag")
    if box.is_selected() != rag:
        box.click()
    question = browser.find_element(By.ID, "question")
    question.clear()
    question.send_keys(QUESTION)
    browser.execute_script("document.getElementById('answer').textContent = ''")
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").text and d.find_element(By.ID, "ask").is_enabled())
    assert browser.find_element(By.ID, "status").text == ""
    return browser.find_element(By.ID, "answer")


def test_the_page_asks_and_shows_the_answer_with_sources(browser, live_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(live_url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("data-loaded") == "true")
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in picker.options] == [TINY, "retrieval-only"]

    def ask_on_page(model: str, rag: bool) -> tuple[str, list[str]]:
        answer = page_ask(browser, wait, model, rag)
        items = browser.find_elements(By.CSS_SELECTOR, "#sources li")
        return answer.text, [i.find_element(By.CLASS_NAME, "score").text for i in items]

    api = httpx.post(f"{live_url}/v1/answer", json={"question": QUESTION, "model": "retrieval-only", "top_k": 3}).json()
    text, scores = ask_on_page("retrieval-only", rag=True)
    assert text == api["cited_answer"]  # the markers are shown as "[n]" links
    assert scores == [f"{s['score']:.3f}" for s in api["sources"]]
    assert " ".join(api["sources"][0]["text"].split()) in browser.find_element(By.CSS_SELECTOR, "#sources li").text

    text, scores = ask_on_page(TINY, rag=False)
    assert scores == [] and browser.find_element(By.ID, "sources-title").text == "No sources (retrieval off)"
    assert "retrieval off" in browser.find_element(By.ID, "meta").text and TINY in browser.find_element(By.ID, "meta").text

    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "question").send_keys("   ")
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert "question is empty" in browser.find_element(By.ID, "status").text


def test_the_page_links_citations_to_their_sections(browser, live_url, answerers):
    """The retrieval-only model answers with the top passage, so its sentences cite source 1: each
    marker is a link to its source with the excerpt as its title, a source opens its whole section,
    and an answer that abstains says so and offers the model's answer anyway."""
    import dataclasses

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def norm(text: str) -> str:
        return " ".join(text.split())

    wait = WebDriverWait(browser, 30)
    browser.get(live_url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("data-loaded") == "true")

    def ask_on_page():
        return page_ask(browser, wait, "retrieval-only", rag=True)

    answer = ask_on_page()
    cited_text = answer.text
    assert "abstained" not in answer.get_attribute("class") and not browser.find_element(By.ID, "raw").is_displayed()
    cites = answer.find_elements(By.CSS_SELECTOR, ".cite")
    assert cites, cited_text
    n = cites[0].get_attribute("data-n")
    assert cites[0].text == f"[{n}]" and cites[0].get_attribute("href").endswith(f"#source-{n}")
    item = browser.find_element(By.ID, f"source-{n}")
    passage = norm(item.find_element(By.CLASS_NAME, "passage").text)
    title = norm(cites[0].get_attribute("title"))
    assert title and title in passage, (title, passage)
    assert "support " in browser.find_element(By.ID, "meta").text

    cites[0].click()
    wait.until(lambda d: "highlight" in d.find_element(By.ID, f"source-{n}").get_attribute("class"))

    view = browser.find_element(By.ID, "section-view")
    assert not view.is_displayed()
    item.find_element(By.CLASS_NAME, "section-link").click()
    wait.until(lambda d: d.find_element(By.ID, "section-view").is_displayed() and d.find_element(By.ID, "section-text").text)
    assert browser.find_element(By.ID, "status").text == ""
    assert " — " in browser.find_element(By.ID, "section-title").text
    assert passage in norm(browser.find_element(By.ID, "section-text").text)
    view.find_element(By.ID, "section-close").click()
    wait.until(lambda d: not d.find_element(By.ID, "section-view").is_displayed())

    # Thresholds no retrieved passage meets: the answer abstains, the page says so and offers the model's answer
    attributor = answerers["retrieval-only"].attributor
    saved = attributor.thresholds
    assert attributor.calibrated  # else the thresholds would not be applied
    attributor.thresholds = dataclasses.replace(saved, relevance=0.99, support=None, embed_model=saved.embed_model)
    try:
        answer = ask_on_page()
        assert "abstained" in answer.get_attribute("class")
        assert answer.text.startswith("Not in the course notes:") and not answer.find_elements(By.CSS_SELECTOR, ".cite")
        assert browser.find_element(By.ID, "sources-title").text == "Closest passages (not an answer)"
        assert browser.find_elements(By.CSS_SELECTOR, "#sources li")
        raw = browser.find_element(By.ID, "raw")
        assert raw.is_displayed() and raw.text == "Show the model's answer anyway"
        raw.click()
        wait.until(lambda d: "abstained" not in d.find_element(By.ID, "answer").get_attribute("class")
                   and d.find_element(By.ID, "ask").is_enabled() and d.find_element(By.ID, "answer").text)
        assert browser.find_element(By.ID, "answer").text == cited_text
        assert not browser.find_element(By.ID, "raw").is_displayed()
        assert browser.find_element(By.ID, "sources-title").text == "Sources"
    finally:
        attributor.thresholds = saved

# --- `aimlqa serve` -----------------------------------------------------------------------


def serve_process(*args: str, home: Path):
    env = os.environ | {"AIMLQA_HOME": str(home), "AIMLQA_API_KEYS": ""}
    return subprocess.Popen([sys.executable, "-m", "aimlqa", "serve", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def test_aimlqa_serve_starts_loads_and_answers(built_index, tmp_path):
    port = free_port()
    proc = serve_process("--model", "retrieval-only", "--index", str(built_index), "--port", str(port), "--log-level", "warning", home=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, proc, 90)
        except RuntimeError as e:
            raise AssertionError(f"{e}: {proc.communicate()[1] if proc.poll() is not None else ''}") from None
        r = httpx.post(f"{url}/v1/answer", json={"question": QUESTION}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "retrieval-only" and "dropout" in r.json()["sources"][0]["text"].lower()
    finally:
        proc.terminate()
        proc.wait(20)


def test_aimlqa_serve_refuses_clearly(tmp_path):
    import typer
    from typer.testing import CliRunner

    from aimlqa.settings import UserError
    from server.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)  # keep `serve` a sub-command, as under `aimlqa`
    register(app)
    runner = CliRunner()
    unknown = runner.invoke(app, ["serve", "--model", "nope"], env={"AIMLQA_HOME": str(tmp_path)})
    assert isinstance(unknown.exception, UserError) and "unknown model 'nope'" in str(unknown.exception)
    no_index = runner.invoke(app, ["serve", "--model", "retrieval-only", "--index", str(tmp_path / "none")], env={"AIMLQA_HOME": str(tmp_path)})
    assert isinstance(no_index.exception, UserError) and "no index at" in str(no_index.exception)

    # A model that cannot load here (4-bit needs CUDA): the server stops and the command says why in one line.
    proc = serve_process("--model", "mistral-7b", "--port", str(free_port()), home=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: the models failed to load" in err and "needs a CUDA GPU" in err
    assert "Traceback" not in err


def test_streaming_sends_tokens_as_they_are_decoded(answerers):
    """stream: true on a tiny model whose every forward pass is slowed to 80 ms: the first content
    arrives after about the prefill and one step, long before the generation ends, the pieces come
    one decoding step apart, and they join to the non-streamed answer."""
    import json as _json

    tiny = answerers[TINY]
    slow = Answerer(tiny.spec, tiny.retriever, generator=type(tiny.generator)(tiny.spec, model=tiny.generator.model, tokenizer=tiny.generator.tokenizer))
    forward = slow.generator.model.forward
    body = {"model": TINY, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "rag": False}
    with live(create_app({TINY: slow}, config=ServerConfig(api_keys=OPEN))) as url:
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
        slow.generator.model.forward = lambda *a, **kw: (time.sleep(0.08), forward(*a, **kw))[1]
        try:
            t0, arrivals, pieces = time.monotonic(), [], []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = _json.loads(line[6:])["choices"][0]["delta"] if _json.loads(line[6:])["choices"] else {}
                        if delta.get("content"):
                            arrivals.append(time.monotonic() - t0)
                            pieces.append(delta["content"])
            end = time.monotonic() - t0
        finally:
            del slow.generator.model.forward
    assert "".join(pieces) == whole, (pieces, whole)
    assert len(pieces) >= 3 and arrivals[0] < end / 2, (arrivals, end)  # the first words long before the last
    assert arrivals[0] < 0.08 * 4 + 0.5  # prefill and a step or two, plus the server's own overhead
