"""The service on Ray Serve: the same FastAPI app (routes, schemas, keys, page) as the Serve ingress,
and the models in `ModelGroup` deployments behind it, one per base in memory, each replicated or
autoscaled. A `ModelGroup` replica holds what one `aimlqa serve` process holds (the index, the
Answerers, the `Service` with its batcher and queue bound); the ingress holds no model and forwards
each question to a group's replica through a Serve handle (`RemoteService`).

    aimlqa serve --ray -m retrieval-only --replicas 2        # a local Ray cluster, or --ray-address

Ray is imported only here and only when asked for (`pip install -e '.[scale]'`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from aimlqa.settings import UserError
from server.config import ServerConfig
from server.errors import ApiError
from server.service import Served, Service, warm_up

log = logging.getLogger("aimlqa.server")
APP_NAME = "aimlqa"


def require_ray():
    try:
        from ray import serve
    except ImportError:
        raise UserError("serving on Ray needs Ray Serve: `pip install -e '.[scale]'`; "
                        "or serve in one process without --ray") from None
    return serve


# --- the plan: which models run where, on how many replicas -------------------------------------


class Autoscaling(BaseModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)  # per replica; Serve adds replicas above it

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class GroupPlan(BaseModel):
    """One model deployment: models that share a base in memory, and the resources of each replica."""

    name: str
    models: list[str]
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None  # instead of a fixed replica count
    num_cpus: float = Field(1.0, gt=0)  # per replica (a CPU model's threads)
    num_gpus: int = Field(0, ge=0)  # per replica: the tensor-parallel group of a vLLM model
    backend: Literal["transformers", "llamacpp", "vllm", "retrieval"] = "transformers"

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))

    def deployment_options(self, config: ServerConfig) -> dict:
        """Ray Serve's options for this group. A replica admits what one process would (a batch
        running and `queue_size` waiting in its own batcher, then 503 + Retry-After), so requests
        queue where they batch, not in Serve's router, which retries a full replica with back-off
        (measured: half the throughput at 64 clients on one replica, docs/scale.md). Serve's
        router holds requests while it picks a replica for them; it may hold `queue_size` too (a
        bound of a batch there turned 10 of 400 requests at 64 clients into 503s)."""
        options = {"name": self.name, "max_ongoing_requests": config.queue_size + config.max_batch_size, "max_queued_requests": config.queue_size,
                   "health_check_period_s": 5.0, "graceful_shutdown_timeout_s": config.request_timeout_s}
        if self.autoscaling:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.replicas
        if self.backend == "vllm" and self.num_gpus > 1:
            # vLLM's Ray executor places one worker per GPU; the replica reserves the whole group
            options["ray_actor_options"] = {"num_cpus": self.num_cpus, "num_gpus": 0}
            options["placement_group_bundles"] = [{"CPU": self.num_cpus}] + [{"GPU": 1}] * self.num_gpus
            options["placement_group_strategy"] = "STRICT_PACK"  # one node: tensor parallelism needs fast links
        else:
            options["ray_actor_options"] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        return options


class ScalePlan(BaseModel):
    groups: list[GroupPlan]
    index: str | None = None  # a path every node sees (shared storage), or a URL fetched once per replica
    index_hash: str | None = None  # the manifest hash replicas must find there: a rebuilt index is a new plan
    mode: str | None = None
    ingress_replicas: int = Field(1, ge=1)
    default_model: str | None = None

    @property
    def models(self) -> list[str]:
        return [m for g in self.groups for m in g.models]


def plan_for(specs: list, *, replicas: int = 1, autoscaling: Autoscaling | None = None, num_cpus: float = 1.0,
             index: str | None = None, index_hash: str | None = None, mode: str | None = None, ingress_replicas: int = 1) -> ScalePlan:
    """Registry entries grouped as one process would load them (`rag.pool.base_key`: one generator per
    base); a vLLM entry's replica takes its `tensor_parallel_size` GPUs."""
    from rag.pool import base_key

    groups: dict[object, list] = {}
    for spec in specs:
        key = base_key(spec) or ("alone", spec.name)
        groups.setdefault(key, []).append(spec)
    out = []
    for i, members in enumerate(groups.values()):
        first = members[0]
        gpus = first.tensor_parallel_size if first.backend == "vllm" else 0
        out.append(GroupPlan(name=f"models-{i}", models=[s.name for s in members], replicas=replicas, autoscaling=autoscaling,
                             num_cpus=num_cpus, num_gpus=gpus, backend=first.backend))
    return ScalePlan(groups=out, index=index, index_hash=index_hash, mode=mode, ingress_replicas=ingress_replicas,
                     default_model=specs[0].name)


# --- the deployments ------------------------------------------------------------------------------


@dataclass
class Failure:
    """An ApiError carried back from a replica as a value (a raised one would arrive wrapped)."""

    status: int
    message: str
    code: str
    headers: dict

    @classmethod
    def of(cls, e: ApiError) -> "Failure":
        return cls(e.status, e.message, e.code, e.headers)

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, self.code, self.headers)


class ModelGroup:
    """A replica: the index and the Answerers of one group, behind the single-process `Service`."""

    def __init__(self, models: list[str], index: str | None, index_hash: str | None, mode: str | None, config: ServerConfig, threads: int = 1):
        import os

        import torch

        from rag.pool import load_answerers
        from rag.registry import get_spec
        from server.metrics import Metrics

        os.environ["AIMLQA_THREADS"] = str(threads)  # this replica's CPUs, not the machine's: replicas share it
        torch.set_num_threads(threads)
        specs = [get_spec(m) for m in models]
        retriever = open_index(index, index_hash, required=any(s.backend == "retrieval" for s in specs))
        answerers = load_answerers(specs, retriever, mode)
        warm_up(answerers)
        self.service = Service(config, Metrics(), answerers)
        self._started: asyncio.Task | None = None

    async def _ready(self):
        if self._started is None:  # the replica's own event loop, which only exists once it serves
            self._started = asyncio.get_running_loop().create_task(self.service.start())
        await self._started
        return self.service

    async def info(self) -> dict:
        service = await self._ready()
        return {"models": {n: a.spec for n, a in service.answerers.items()}, "adapters": {n: a.adapter for n, a in service.answerers.items()},
                "index": await service.index_info()}

    async def section(self, section_id: str):
        try:
            return await (await self._ready()).section(section_id)
        except ApiError as e:
            return Failure.of(e)

    async def answer(self, model: str, question: str, kw: dict):
        try:
            return await (await self._ready()).answer(model, question, **kw)
        except ApiError as e:
            return Failure.of(e)

    async def answer_stream(self, model: str, question: str, kw: dict):
        """The pieces of the cited text as they are generated, then the Result (or a Failure)."""
        pieces: asyncio.Queue = asyncio.Queue()
        service = await self._ready()
        task = asyncio.create_task(service.answer(model, question, on_text=pieces.put_nowait, **kw))
        while not (task.done() and pieces.empty()):
            getter = asyncio.create_task(pieces.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        try:
            yield task.result()
        except ApiError as e:
            yield Failure.of(e)

    def check_health(self) -> None:
        """Serve replaces a replica whose batcher died."""
        if self.service.state == "ready" and not all(b.alive for b in self.service.batchers.values()):
            raise RuntimeError("a batcher stopped")


def open_index(index: str | None, expected_hash: str | None, required: bool):
    """The index a replica serves: a local path, or a URL fetched once into $AIMLQA_HOME; it must be
    the one the plan names (its manifest hash), so replicas of one plan never mix two indexes."""
    from index.fetch import materialize
    from rag.cli import open_retriever

    retriever = open_retriever(materialize(index) if index else None, required=required)
    if expected_hash and retriever is not None and retriever.manifest_hash != expected_hash:
        raise UserError(f"the index at {index} has manifest hash {retriever.manifest_hash}, not {expected_hash} as planned; "
                        "deploy the plan of the index that is there")
    return retriever


@dataclass
class RemoteModel:
    """A model served by a group: what the routes read of it (`/v1/models`), and the group's handle."""

    spec: object  # rag.registry.ModelSpec
    adapter: str | None
    handle: object


class RemoteService(Served):
    """`server.service.Service`'s face to the routes, over the ModelGroup deployments: the routes and
    schemas are the single-process server's own. A replica lost mid-request is retried once on
    another (answers have no side effects); queue bounds come back as 503 + Retry-After."""

    RETRY_AFTER_S = 1

    def __init__(self, plan: ScalePlan, config: ServerConfig):
        self.plan, self.config = plan, config
        self.state, self.load_error = "loading", ""
        self.answerers: dict[str, RemoteModel] = {}
        self._load_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Connected before the ingress replica takes traffic (this runs in its ASGI start-up): in a
        roll-over, the old ingress answers until the new one reaches the model groups."""
        self._load_task = asyncio.get_running_loop().create_task(self._connect())
        await self._load_task

    async def stop(self) -> None:
        if self._load_task:
            self._load_task.cancel()

    async def _connect(self) -> None:
        serve = require_ray()
        while self.state == "loading":
            try:
                for group in self.plan.groups:
                    handle = serve.get_deployment_handle(group.name, app_name=APP_NAME)
                    info = await handle.info.remote()
                    for name, spec in info["models"].items():
                        self.answerers[name] = RemoteModel(spec, info["adapters"][name], handle)
                self.state = "ready"
            except Exception as exc:  # a group still starting: Serve answers once its replicas are up
                log.info("waiting for the model deployments: %s", exc)
                await asyncio.sleep(1)

    @property
    def preferred_model(self) -> str | None:
        return self.plan.default_model

    def require_ready(self) -> None:
        if self.state != "ready":
            raise ApiError(503, "the model deployments are still starting; retry shortly", "loading", {"Retry-After": "5"})

    async def index_info(self) -> dict | None:
        """Asked of a replica each time: during a roll-over, the index that replica serves."""
        if self.state != "ready":
            return None
        return (await self._call(self._any().handle.info))["index"]

    def _any(self) -> RemoteModel:
        """Any group: each holds the same index."""
        self.require_ready()
        return next(iter(self.answerers.values()))

    async def _call(self, method, *args):
        """One call to a replica, retried once on another if the first was lost or overloaded."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in (1, 2):
            try:
                out = await method.remote(*args)
            except BackPressureError:
                raise ApiError(503, f"the model deployment has {self.config.queue_size} requests waiting; retry in {self.RETRY_AFTER_S} s",
                               "queue_full", {"Retry-After": str(self.RETRY_AFTER_S)}) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                log.warning("a replica was lost (%s); %s", type(exc).__name__, "retrying on another" if attempt == 1 else "giving up")
                if attempt == 2:
                    raise ApiError(503, "the replica answering was lost; retry", "replica_lost", {"Retry-After": str(self.RETRY_AFTER_S)}) from None
                continue
            if isinstance(out, Failure):
                raise out.error()
            return out

    async def section(self, section_id: str) -> dict:
        return await self._call(self._any().handle.section, section_id)

    async def answer(self, model: str | None, question: str, *, on_text=None, **kw):
        name, served = self.resolve(model)
        handle = served.handle
        if on_text is None:
            return await self._call(handle.answer, name, question, kw)
        result = None
        async for item in handle.options(stream=True).answer_stream.remote(name, question, kw):
            if isinstance(item, str):
                on_text(item)
            elif isinstance(item, Failure):
                raise item.error()
            else:
                result = item
        return result

    async def load_adapter(self, name: str, lora_path: str):
        raise ApiError(400, "on Ray Serve, adapters are part of the deployment: register the adapter, add it with -m and "
                       "deploy again (replicas roll over without downtime); live loading is for the single-process server", "not_on_ray")

    unload_adapter = load_adapter


def application(plan: ScalePlan, config: ServerConfig):
    """The Serve application: the ingress (our FastAPI app, built on each ingress replica) bound to the
    model groups. `serve.run(application(...))` deploys it; running it again with a new plan (a
    rebuilt index, other replicas) rolls the replicas over: new ones start, old ones drain."""
    serve = require_ray()
    from server.app import create_app

    groups = [serve.deployment(ModelGroup, **g.deployment_options(config)).bind(g.models, plan.index, plan.index_hash, plan.mode, config, g.threads)
              for g in plan.groups]
    ingress = serve.deployment(serve.ingress(lambda: create_app(service=RemoteService(plan, config), config=config))(_Ingress),
                               name="ingress", num_replicas=plan.ingress_replicas, ray_actor_options={"num_cpus": 0},  # like Serve's proxy: I/O
                               max_ongoing_requests=4 * (config.queue_size + config.max_batch_size))
    return ingress.bind(*groups)


class _Ingress:
    def __init__(self, *groups):
        self.groups = groups  # bound so that Serve deploys them with the ingress; reached by name


def run(plan: ScalePlan, config: ServerConfig, host: str, port: int, address: str | None = None, blocking: bool = True,
        log_level: str = "warning"):
    """Start (or join) a Ray cluster, deploy the plan (or roll the running one over to it), and serve
    until interrupted."""
    serve = require_ray()
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": _forwarded_env()})
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(plan, config), name=APP_NAME, route_prefix="/", blocking=False,
                  logging_config={"log_level": log_level.upper(), "enable_access_log": log_level.lower() in ("debug", "info")})
    except RuntimeError as e:  # a replica's constructor failed (a missing model, the wrong index): Serve says which
        raise UserError(f"the deployment failed: {e}") from None
    if blocking:
        import signal

        for stop in (signal.SIGINT, signal.SIGTERM):  # a terminated server drains like Ctrl-C (even started with SIGINT ignored, as `cmd &` does)
            signal.signal(stop, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
            ray.shutdown()


def _forwarded_env() -> dict:
    """Settings the replicas must share with the process that planned them."""
    import os

    return {k: v for k, v in os.environ.items() if k.startswith("AIMLQA_") or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
