"""The service on Ray Serve (issue 25). The plan and the deployment graph are checked without a
cluster (the vLLM groups cannot run here: no GPU); then a real local Ray cluster serves the
retrieval-only model on 2 replicas behind the same FastAPI app, reached with curl and the openai
client, loses a replica under load, rolls over to a rebuilt index, and holds its queue bound."""

from __future__ import annotations

import json
import subprocess
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aimlqa.settings import UserError
from server.config import ServerConfig

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (make install adds the scale extra)")
from server import scale  # noqa: E402


def specs(*names):
    from rag.registry import get_spec

    return [get_spec(n) for n in names]


def test_models_on_one_base_share_a_group_and_vllm_replicas_take_their_gpus():
    plan = scale.plan_for(specs("gemma-270m-aiml", "gemma-270m", "retrieval-only", "llama-3.1-8b-vllm"), replicas=3)
    assert [g.models for g in plan.groups] == [["gemma-270m-aiml", "gemma-270m"], ["retrieval-only"], ["llama-3.1-8b-vllm"]]
    assert plan.default_model == "gemma-270m-aiml" and plan.models[0] == "gemma-270m-aiml"
    config = ServerConfig(api_keys=frozenset(), max_batch_size=4, queue_size=10)
    cpu, _, gpu = (g.deployment_options(config) for g in plan.groups)
    assert cpu["num_replicas"] == 3 and cpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}
    assert cpu["max_ongoing_requests"] == 14 and cpu["max_queued_requests"] == 10  # the one-process bound (a batch + the queue), as much in Serve's router
    # the 8B model over 2 GPUs: the replica reserves a placement group of them on one node for vLLM's Ray workers
    assert gpu["placement_group_bundles"] == [{"CPU": 1.0}, {"GPU": 1}, {"GPU": 1}] and gpu["placement_group_strategy"] == "STRICT_PACK"
    assert gpu["ray_actor_options"]["num_gpus"] == 0
    auto = scale.plan_for(specs("retrieval-only"), autoscaling=scale.Autoscaling(min_replicas=1, max_replicas=6)).groups[0]
    assert auto.deployment_options(config)["autoscaling_config"]["max_replicas"] == 6 and "num_replicas" not in auto.deployment_options(config)


def test_the_registry_and_the_plan_refuse_what_cannot_run():
    from rag.registry import ModelSpec

    assert specs("mistral-7b-vllm")[0].tensor_parallel_size == 2
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs backend: vllm"):
        ModelSpec(name="x", family="llama", base="b", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="min_replicas 3 is above max_replicas 2"):
        scale.Autoscaling(min_replicas=3, max_replicas=2)


def test_vllm_gets_tensor_parallelism_on_the_ray_executor(monkeypatch):
    # No GPU here: vLLM's LLM class is faked; what runs is our side, which must ask for TP on Ray.
    import types

    from rag.generators import vllm as backend

    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen.update(kw)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(backend, "require_vllm", lambda: types.SimpleNamespace(LLM=LLM))
    monkeypatch.setattr(backend, "resolve_base", lambda base: base)
    backend.VLLMGenerator(specs("llama-3.1-8b-vllm")[0])
    assert seen["tensor_parallel_size"] == 2 and seen["distributed_executor_backend"] == "ray" and seen["dtype"] == "bfloat16"


def test_the_application_graph_is_the_one_app_over_the_model_groups():
    plan = scale.plan_for(specs("gemma-270m-aiml", "retrieval-only"), replicas=2, index="/shared/indexes/course", index_hash="abc")
    app = scale.application(plan, ServerConfig(api_keys=frozenset()))
    ingress = app._bound_deployment
    assert ingress.name == "ingress" and ingress.ray_actor_options["num_cpus"] == 0
    groups = ingress.init_args
    assert [g._bound_deployment.name for g in groups] == ["models-0", "models-1"]
    assert all(g._bound_deployment.num_replicas == 2 for g in groups)
    models, index, pinned, *_ = groups[0]._bound_deployment.init_args
    assert models == ["gemma-270m-aiml"] and index == "/shared/indexes/course" and pinned == "abc"


def test_an_index_is_fetched_once_by_url_and_must_be_the_planned_one(built_index, tmp_path, monkeypatch):
    from index.fetch import materialize
    from index.retriever import Retriever

    monkeypatch.setenv("AIMLQA_HOME", str(tmp_path / "home"))
    packed = tmp_path / "course.tar.gz"
    with tarfile.open(packed, "w:gz") as tar:
        tar.add(built_index, arcname="course")
    path = materialize(f"file://{packed}")
    assert (path / "manifest.json").is_file() and materialize(f"file://{packed}") == path  # once
    assert Retriever.load(path).manifest_hash == Retriever.load(built_index).manifest_hash
    assert materialize(str(built_index)) == built_index  # a path is used where it is
    with pytest.raises(UserError, match="could not fetch the index"):
        materialize(f"file://{tmp_path}/missing.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(UserError, match="not a packed index"):
        materialize(f"file://{tmp_path}/junk.tar.gz")
    assert not list((tmp_path / "home" / "indexes" / "fetched").glob(".*.tmp"))  # nothing half-unpacked left
    with pytest.raises(UserError, match="not .* as planned"):
        scale.open_index(str(built_index), "0000000000000000", required=True)


# --- a real local Ray cluster ------------------------------------------------------------------


def ask(http, question: str, tries: int = 2):
    """A client with the documented retry: once more after a 503 (waiting its Retry-After) or a dropped connection."""
    import httpx

    for attempt in range(1, tries + 1):
        try:
            reply = http.post("/v1/answer", json={"question": question, "model": "retrieval-only"})
        except httpx.TransportError:
            if attempt == tries:
                raise
            continue
        if reply.status_code == 503 and attempt < tries:
            time.sleep(float(reply.headers.get("retry-after", 1)))
            continue
        return reply, attempt


def replica_names(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{scale.APP_NAME}#{deployment}#")]


@pytest.fixture(scope="module")
def cluster(built_index, tiny_models, tmp_path_factory):
    """A local Ray cluster serving 2 replicas of `retrieval-only` and 1 of a tiny random llama (so
    that an answer streams in several pieces), both on the test index."""
    from index.retriever import Retriever
    from rag.registry import register
    from server.local import free_port

    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIMLQA_MODELS", str(tmp_path_factory.mktemp("registry") / "models.yaml"))  # forwarded to the replicas
        register("tiny-llama", family="llama", base=str(tiny_models["llama"]), context_window=256, max_new_tokens=8, dtype="float32")
        ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": scale._forwarded_env()})
        port = free_port()
        pinned = Retriever.load(built_index).manifest_hash
        plan = scale.plan_for(specs("retrieval-only"), replicas=2, num_cpus=1, index=str(built_index), index_hash=pinned)
        tiny = scale.plan_for(specs("tiny-llama"), num_cpus=0.5).groups[0].model_copy(update={"name": "models-1"})
        plan = plan.model_copy(update={"groups": [*plan.groups, tiny]})
        scale.run(plan, ServerConfig(api_keys=frozenset()), "127.0.0.1", port, blocking=False)
        yield f"http://127.0.0.1:{port}", plan
        serve.shutdown()
        ray.shutdown()


def curl(url: str, body: dict | None = None) -> tuple[int, str]:
    """(status, body) of a GET, or of a JSON POST, sent by curl as a user would; by httpx on a machine without curl."""
    import shutil

    if shutil.which("curl") is None:
        import httpx

        reply = httpx.post(url, json=body, timeout=60) if body is not None else httpx.get(url, timeout=60)
        return reply.status_code, reply.text
    post = ["-X", "POST", "-H", "content-type: application/json", "-d", json.dumps(body)] if body is not None else []
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *post, url], capture_output=True, text=True, check=True).stdout
    text, _, status = out.rpartition("\n")
    return int(status), text


@pytest.mark.scale
def test_two_replicas_answer_through_the_same_app_with_curl_and_the_openai_client(cluster):
    import openai

    url, plan = cluster
    assert len(replica_names("models-0")) == 2
    status, text = curl(f"{url}/readyz")
    ready = json.loads(text)
    assert status == 200 and ready["status"] == "ready" and ready["models"] == ["retrieval-only", "tiny-llama"] and ready["index"]["manifest_hash"] == plan.index_hash
    status, text = curl(f"{url}/v1/answer", {"question": "How does dropout reduce overfitting?", "top_k": 2})
    answer = json.loads(text)
    assert status == 200 and "dropout" in answer["answer"].lower() and len(answer["sources"]) == 2 and answer["model"] == "retrieval-only"
    assert curl(f"{url}/v1/answer", {"question": ""})[0] == 422  # the app's own validation, through Serve
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    chat = client.chat.completions.create(model="retrieval-only", messages=[{"role": "user", "content": "What is a kernel in a convolution?"}])
    assert "kernel" in chat.choices[0].message.content.lower()
    # a generator's answer streams from its replica through the ingress, piece by piece
    ask_tiny = dict(model="tiny-llama", messages=[{"role": "user", "content": "What does dropout do?"}], max_tokens=8)
    whole = client.chat.completions.create(**ask_tiny).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(**ask_tiny, stream=True) if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert [m.id for m in client.models.list().data] == ["retrieval-only", "tiny-llama"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    from urllib.parse import quote

    cited = answer["sources"][0]["section_id"]
    status, text = curl(f"{url}/v1/sections/{quote(cited, safe='')}")
    assert status == 200 and json.loads(text)["section_id"] == cited and json.loads(text)["text"]
    assert curl(f"{url}/v1/sections/nowhere")[0] == 404


@pytest.mark.scale
def test_a_replica_killed_under_load_fails_no_request_after_one_retry(cluster):
    import httpx

    url, _ = cluster
    questions = ["How does dropout reduce overfitting?", "What does the learning rate control?", "How big is a convolution's output?"]
    done = []
    killed = threading.Event()

    def one(i: int):
        with httpx.Client(base_url=url, timeout=60) as http:
            t0 = time.perf_counter()
            reply, attempts = ask(http, questions[i % 3])
            done.append(i)
            return reply.status_code, attempts, time.perf_counter() - t0

    def kill_one():
        while len(done) < 40:
            time.sleep(0.01)
        victim = replica_names("models-0")[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed.set()

    killer = threading.Thread(target=kill_one)
    killer.start()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    killer.join()
    assert killed.is_set()
    statuses = [s for s, _, _ in results]
    assert statuses == [200] * 200, {s: statuses.count(s) for s in set(statuses)}
    # Serve replaces the lost replica
    deadline = time.monotonic() + 60
    while len(replica_names("models-0")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(replica_names("models-0")) == 2


@pytest.mark.scale
def test_a_rebuilt_index_rolls_out_without_downtime_and_the_queue_bound_holds(cluster, course_dir, embedder, tmp_path):
    import httpx

    from index.retriever import Retriever, build_index
    from index.store import BuildConfig

    url, plan = cluster
    rebuilt = tmp_path / "course-v2"
    build_index([course_dir], rebuilt, BuildConfig(chunk_size=48, chunk_overlap=4), progress=False, embedder=embedder)
    new_hash = Retriever.load(rebuilt).manifest_hash
    assert new_hash != plan.index_hash
    tight = ServerConfig(api_keys=frozenset(), max_batch_size=1, queue_size=1)
    new_plan = plan.model_copy(update={"index": str(rebuilt), "index_hash": new_hash})
    rollout = threading.Thread(target=scale.run, args=(new_plan, tight, "127.0.0.1", 0), kwargs={"blocking": False})  # both groups roll over
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as http:
        rollout.start()
        while rollout.is_alive():  # requests keep being answered while replicas roll over
            statuses.append(ask(http, "What does dropout do?")[0].status_code)
        rollout.join()
        assert statuses and set(statuses) == {200}, statuses
        assert http.get("/readyz").json()["index"]["manifest_hash"] == new_hash

        def burst(_):
            with httpx.Client(base_url=url, timeout=60) as h:
                return h.post("/v1/answer", json={"question": "What is gradient descent?"})

        with ThreadPoolExecutor(64) as pool:
            replies = list(pool.map(burst, range(64)))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        assert all(r.headers.get("retry-after") for r in replies if r.status_code == 503)
        assert ask(http, "What is gradient descent?")[0].status_code == 200  # still up


def test_serve_says_which_options_need_ray_and_what_detach_needs(built_index):
    import sys

    for args, says in ((["--replicas", "2"], "are for --ray"), (["--ray", "--detach"], "--detach needs --ray-address"),
                       (["--ray", "--autoscale", "4"], "give MIN:MAX replicas")):
        run = subprocess.run([sys.executable, "-m", "aimlqa", "serve", "-m", "retrieval-only", "--index", str(built_index), *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
