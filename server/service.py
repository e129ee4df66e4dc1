"""The service behind the routes: the served Answerers, a Batcher per base model in memory (its
adapters batch together), adapters loaded and unloaded live, and the request limits.

Routes stay thin: they translate bodies; this decides which model answers, whether a request
fits, and turns queueing, time-outs and failures into one clear `ApiError` each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import astuple, dataclass
from typing import Callable, NamedTuple

from aimlqa.settings import UserError
from rag.answer import Answerer, answer_batch
from rag.generators.base import default_config
from rag.citing import CitedStream
from rag.postprocess import StreamCleaner
from server.adapters import locate
from server.batching import Batcher, QueueFull, Stopped
from server.config import ServerConfig
from server.errors import ApiError
from server.metrics import Metrics

log = logging.getLogger("aimlqa.server")

Loader = Callable[[], dict]  # -> {name: Answerer}, run in a thread at start-up


class BatchKey(NamedTuple):
    """Requests with equal keys can share one generate call, whichever adapter of the base each names."""

    rag: bool
    k: int
    abstain: bool
    max_new_tokens: int | None
    temperature: float | None
    num_beams: int | None = None
    defaults: tuple = ()  # the model's own generation defaults: models that differ there batch apart


def generation_defaults(spec) -> tuple:
    """The model's own decoding settings, as the generator would apply them (`default_config`)."""
    return astuple(default_config(spec))


@dataclass
class Result:
    answer: object  # rag.answer.Answer
    queue_ms: float
    finish_reason: str  # stop | length


def warm_up(answerers: dict) -> None:
    """One tiny answer per model before saying ready: the first call pays for lazy initialisation
    (several seconds on a CPU), which should not land on a user's request."""
    for answerer in answerers.values():
        gen = {} if answerer.generator is None else {"max_new_tokens": 1}
        answerer.answer_many(["What is machine learning?"], rag=answerer.retriever is not None, k=1, **gen)


class Served:
    """Which served model a request names: the part of a service that does not depend on where the
    models run (this process, or Ray Serve replicas: `server.scale.RemoteService`). A service has
    `answerers` ({name: what answers it}), `preferred_model` and `require_ready()`."""

    answerers: dict
    preferred_model: str | None = None

    @property
    def default_model(self) -> str:
        return self.preferred_model if self.preferred_model in self.answerers else next(iter(self.answerers))

    def resolve(self, name: str | None):
        """A served model by name: a request can name only these, never a path or a hub id."""
        self.require_ready()
        name = name or self.default_model
        if name not in self.answerers:
            raise ApiError(404, f"unknown model {name!r}; this server serves: {', '.join(self.answerers)}", "model_not_found")
        return name, self.answerers[name]


class Service(Served):
    def __init__(self, config: ServerConfig, metrics: Metrics, answerers: dict | None = None, loader: Loader | None = None,
                 on_load_error: Callable[[str], None] | None = None):
        if (answerers is None) == (loader is None):
            raise ValueError("give either answerers or a loader")
        self.config = config
        self.metrics = metrics
        self._given = answerers
        self._loader = loader
        self._on_load_error = on_load_error
        self.answerers: dict = {}
        self.batchers: dict[str, Batcher] = {}  # one per base in memory, named for its first model
        self.pool_of: dict[str, str] = {}  # model name -> its batcher's name
        self._inflight: dict[str, int] = {}  # model name -> requests admitted and not yet answered
        self._adapter_lock = asyncio.Lock()  # one adapter load or unload at a time
        self.state = "loading"  # loading | ready | failed
        self.load_error = ""
        self._load_task: asyncio.Task | None = None

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running event loop; a service runs on one loop at a time."""
        if self.batchers or self._load_task:
            raise RuntimeError("this app is already running; create one app per server")
        if self._given is not None:
            self._install(self._given)
        else:
            self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            answerers = await asyncio.to_thread(self._loader)
            await asyncio.to_thread(warm_up, answerers)
            self._install(answerers)
        except Exception as exc:
            self.state = "failed"
            self.load_error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            log.error("loading the models failed: %s", self.load_error, exc_info=not isinstance(exc, UserError))
            if self._on_load_error:
                self._on_load_error(self.load_error)
            return
        log.info("ready: %s", ", ".join(self.answerers))

    def _install(self, answerers: dict) -> None:
        if not answerers:
            raise ValueError("serve at least one model")
        pools: dict[int, str] = {}  # Answerers on one generator share its batcher, so their requests batch together
        for name, answerer in answerers.items():
            shared = id(answerer.generator) if answerer.generator is not None else id(answerer)
            if shared in pools:
                self.pool_of[name] = pools[shared]
                continue
            pools[shared] = self.pool_of[name] = name
            batcher = Batcher(
                self._work,
                max_batch_size=self.config.max_batch_size,
                max_wait_s=self.config.max_wait_ms / 1000,
                queue_size=self.config.queue_size,
                on_batch=lambda size, s, n=name: self.metrics.observe_batch(n, size, s),
                on_depth=self.metrics.queue_depth.labels(name).set,
            )
            batcher.start()
            self.batchers[name] = batcher
            self.metrics.queue_depth.labels(name).set(0)
        self.answerers = dict(answerers)
        self.state = "ready"

    async def stop(self) -> None:
        if self._load_task:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        for batcher in self.batchers.values():
            await batcher.stop()
        self.batchers, self.answerers, self.pool_of, self._load_task, self.state = {}, {}, {}, None, "loading"

    # --- what is served -----------------------------------------------------------------

    @property
    def preferred_model(self) -> str | None:
        return self.config.default_model

    def require_ready(self) -> None:
        if self.state == "loading":
            raise ApiError(503, "the models are still loading; retry shortly", "loading", {"Retry-After": "5"})
        if self.state == "failed":
            raise ApiError(503, f"the models failed to load: {self.load_error}", "load_failed")

    async def section(self, section_id: str) -> dict:
        """A cited section's text, from the served index: what a citation's link opens."""
        self.require_ready()
        retriever = next((a.retriever for a in self.answerers.values() if a.retriever is not None), None)
        chunks = retriever.section(section_id) if retriever is not None else []
        if not chunks:
            raise ApiError(404, f"no section {section_id!r} in the served index; section ids come from an answer's sources", "section_not_found")
        text, end = "", -1
        for c in chunks:  # overlapping chunks of one section: each character once
            text += c.text if c.start >= end or c.kind != "prose" else c.text[max(0, end - c.start):]
            end = max(end, c.end)
        first = chunks[0]
        return {"section_id": section_id, "source": first.source, "title": first.title, "section": first.section, "text": text.strip()}

    async def index_info(self) -> dict | None:
        for a in self.answerers.values():
            if a.retriever is not None:
                r = a.retriever
                return {"path": str(r.path), "chunks": len(r.chunks), "embed_model": r.manifest.get("embed_model"), "manifest_hash": r.manifest_hash}
        return None

    # --- answering ----------------------------------------------------------------------

    async def answer(self, model: str | None, question: str, *, rag: bool, k: int, max_new_tokens: int | None,
                     temperature: float | None, request_id: str, num_beams: int | None = None, abstain: bool = True,
                     on_text: Callable[[str], None] | None = None) -> Result:
        """`on_text`: called on the event loop with each new piece of the answer's cited text as it
        is generated (the pieces join to `Answer.cited_text`; after an answer that abstained once
        generated, the notice follows what was shown), the last one before this returns."""
        t0 = time.monotonic()
        name, answerer = self.resolve(model)
        sink = stream = None
        if on_text is not None and answerer.generator is not None:
            loop = asyncio.get_running_loop()
            stream = CitedStream(StreamCleaner(answerer.template.stop), answerer.attributor, question)

            def feed(raw: str, passages: list) -> None:  # in the worker thread, after each decoding step
                if piece := stream.feed(raw, passages):
                    loop.call_soon_threadsafe(on_text, piece)

            sink = feed
        gen = answerer.generator
        wanted = max_new_tokens or answerer.spec.max_new_tokens
        if gen is not None and wanted >= gen.context_window:
            raise ApiError(400, f"max_new_tokens={wanted} does not fit {name}'s context window of {gen.context_window} tokens", "max_new_tokens")
        key = BatchKey(rag, k, abstain, max_new_tokens, *((temperature, num_beams, generation_defaults(answerer.spec)) if gen is not None else (None, None)))
        try:
            job = self.batchers[self.pool_of[name]].submit((answerer, question, sink), key)
        except QueueFull as full:
            self.metrics.refused.labels(name, "queue_full").inc()
            raise ApiError(503, f"{name} has {self.config.queue_size} requests waiting; retry in {full.retry_after} s",
                           "queue_full", {"Retry-After": str(full.retry_after)}) from None
        self._inflight[name] = self._inflight.get(name, 0) + 1
        try:
            answer = await asyncio.wait_for(job.future, self.config.request_timeout_s - (time.monotonic() - t0))
        except TimeoutError:
            self.metrics.refused.labels(name, "timeout").inc()
            raise ApiError(504, f"no answer within the {self.config.request_timeout_s:g} s limit; retry later or lower max_new_tokens",
                           "timeout") from None
        except (ApiError, UserError):
            raise
        except Stopped:
            raise ApiError(503, "the server is shutting down", "stopping", {"Retry-After": "5"}) from None
        except Exception as exc:
            self.metrics.refused.labels(name, "failed").inc()
            log.error("request %s: %s failed to answer", request_id, name, exc_info=exc)
            raise ApiError(500, f"generating the answer failed; quote request id {request_id} when reporting it", "generation_failed") from None
        finally:
            self._inflight[name] -= 1
        if on_text is not None and (rest := stream.finish(answer) if stream else answer.cited_text):
            on_text(rest)
        self.metrics.observe_tokens(name, answer.prompt_tokens, answer.completion_tokens)
        limit = max_new_tokens or answerer.spec.max_new_tokens
        finish = "length" if gen is not None and answer.completion_tokens >= limit else "stop"
        return Result(answer, round(((job.started or t0) - job.enqueued) * 1000, 2), finish)

    def _work(self, items: list[tuple], key: BatchKey) -> list:
        """One batch of (Answerer, question, sink or None), in the worker thread (tokenizers are not safe to share
        across threads, so questions are measured here, next to generation): a question that does not
        fit fails alone. The Answerers share one generator; each row runs through its own adapter."""
        problems = [self._token_problem(a, q, key.max_new_tokens) for a, q, _ in items]
        fits = [item for item, p in zip(items, problems) if p is None]
        gen = {} if items[0][0].generator is None else {"max_new_tokens": key.max_new_tokens, "temperature": key.temperature, "num_beams": key.num_beams}
        pairs, sinks = [(a, q) for a, q, _ in fits], [sink for *_, sink in fits]
        answers = iter(answer_batch(pairs, rag=key.rag, k=key.k, sinks=sinks, abstain=key.abstain, **gen) if fits else [])
        return [ApiError(400, p, "question_too_long") if p else next(answers) for p in problems]

    def _token_problem(self, answerer, question: str, max_new_tokens: int | None) -> str | None:
        gen = answerer.generator
        if gen is None:
            return None
        n = gen.count_tokens(question)
        if n > self.config.max_question_tokens:
            return f"the question is {n} tokens long; the limit is {self.config.max_question_tokens}"
        new = max_new_tokens or answerer.spec.max_new_tokens
        prompt = gen.count_tokens(answerer.template.plain.format(question=question.strip()))
        if prompt + new > gen.context_window:
            return (f"the question ({prompt} prompt tokens) and max_new_tokens={new} do not fit {answerer.spec.name}'s "
                    f"context window of {gen.context_window} tokens; shorten the question or lower max_new_tokens")
        return None

    # --- adapters as live resources -------------------------------------------------------

    async def load_adapter(self, name: str, lora_path: str) -> Answerer:
        """Serve a fine-tuned adapter under `name`, beside the base it was trained on, at once. Every
        check runs before the model is touched; a failed load leaves what is served as it was."""
        self.require_ready()
        async with self._adapter_lock:
            if name in self.answerers:
                raise ApiError(409, f"a model named {name!r} is already served; unload it first or pick another name", "name_taken")
            found = locate(self.config.adapters_root, lora_path)
            hosts = [a for a in self.answerers.values() if a.generator is not None and hasattr(a.generator, "load_adapter")]
            host = next((a for a in hosts if a.spec.base == found.base), None)
            if host is None:
                bases = sorted({a.spec.base for a in hosts}) or ["none that take adapters"]
                raise ApiError(400, f"the adapter at {lora_path!r} was trained on {found.base!r}; this server serves the base(s) "
                               f"{', '.join(bases)}", "base_mismatch")
            try:
                await asyncio.to_thread(host.generator.load_adapter, name, str(found.path))
            except UserError as e:
                raise ApiError(400, str(e), "invalid_adapter") from None
            recipe = found.manifest.get("recipe") or {}
            spec = host.spec.model_copy(update={"name": name, "adapter": str(found.path),
                                                "description": f"{recipe.get('name', 'adapter')} fine-tuned ({found.manifest.get('method', 'lora')}), loaded live"})
            answerer = Answerer(spec, host.retriever, generator=host.generator, mode=host.mode, adapter=name)
            self.pool_of[name] = self.pool_of[host.spec.name]
            self.answerers[name] = answerer
            log.info("adapter %s loaded from %s on %s", name, found.path, found.base)
            return answerer

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests for it get 404 at once, admitted ones finish, then
        its weights are freed."""
        self.require_ready()
        async with self._adapter_lock:
            answerer = self.answerers.get(name)
            if answerer is None:
                raise ApiError(404, f"no model named {name!r} is served; served: {', '.join(self.answerers)}", "model_not_found")
            if answerer.adapter is None:
                raise ApiError(400, f"{name!r} is a base model, not an adapter; only adapters can be unloaded", "not_an_adapter")
            del self.answerers[name]
            while self._inflight.get(name):
                await asyncio.sleep(0.01)
            self.pool_of.pop(name, None)
            self._inflight.pop(name, None)
            await asyncio.to_thread(answerer.generator.unload_adapter, answerer.adapter)
            log.info("adapter %s unloaded", name)
