"""The FastAPI app: routes over a `Service` of Answerers.

`create_app(answerers)` serves ready Answerers (tests: tiny models and a small index);
`create_app(loader=...)` loads them in the background, so `/healthz` answers at once and
`/readyz` says when the models and the index are in.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError

import aimlqa
from server import errors
from server.auth import check_key, require_key
from server.chat import router as chat_router
from server.config import ServerConfig
from server.errors import ApiError, describe_validation, request_id
from server.metrics import Metrics
from server.middleware import RequestContext
from server.schemas import (AdapterStatus, AnswerRequest, AnswerResponse, ErrorResponse, LoadLoraAdapterRequest, ModelCard, ModelList, SectionOut, SeedRequest,
                            Timings, UnloadLoraAdapterRequest, Usage)
from server.service import Loader, Result, Service

PAGE = Path(__file__).with_name("static") / "index.html"
# The page loads nothing from elsewhere: inline script and style, requests only to this server.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def documented(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse} for s in statuses}


ERRORS = documented(400, 401, 404, 422, 500, 503, 504)  # what an answering route can return
router = APIRouter()


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str  # ready | loading | failed
    models: list[str]
    index: dict | None = None
    error: str | None = None


def service_of(request: Request) -> Service:
    return request.app.state.service


def answer_response(result: Result) -> AnswerResponse:
    a = result.answer
    att = a.attribution
    return AnswerResponse(
        answer=a.text,
        cited_answer=a.cited_text,
        sentences=att.sentences if att and not a.abstained else [],
        support=att.support if att else None,
        relevance=att.relevance if att else None,
        abstained=a.abstained,
        raw_answer=a.raw_text,
        sources=a.sources,
        model=a.model,
        rag=a.rag,
        usage=Usage(prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens),
        timings=Timings(retrieve_ms=a.timings.get("retrieve_ms", 0.0), generate_ms=a.timings.get("generate_ms", 0.0),
                        attribute_ms=a.timings.get("attribute_ms", 0.0), queue_ms=result.queue_ms),
    )


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz():
    """Alive: the process answers HTTP (models may still be loading)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, tags=["health"], responses={503: {"model": Ready}})
async def readyz(request: Request):
    """Ready: every model and the index are loaded; 503 while loading or after a failed load."""
    service = service_of(request)
    body = Ready(status=service.state, models=list(service.answerers), index=await service.index_info(), error=service.load_error or None)
    return JSONResponse(body.model_dump(), status_code=200 if service.state == "ready" else 503)


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_key)], responses=documented(401, 503))
async def models(request: Request):
    """The served models (OpenAI's list shape, with family and backend)."""
    service = service_of(request)
    service.require_ready()
    return ModelList(data=[ModelCard(id=n, family=a.spec.family, backend=a.spec.backend, description=a.spec.description,
                                     parent=None if a.adapter is None else a.spec.base)
                           for n, a in service.answerers.items()])


@router.post("/v1/load_lora_adapter", response_model=AdapterStatus, dependencies=[Depends(require_key)], tags=["adapters"],
             responses=documented(400, 401, 403, 404, 409, 422, 503))
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request):
    """Serve a fine-tuned LoRA adapter at once, beside the base it was trained on (vLLM's endpoint).
    `lora_path` must be under the server's adapters directory and hold the manifest `aimlqa finetune`
    writes; a failed load changes nothing."""
    answerer = await service_of(request).load_adapter(body.lora_name, body.lora_path)
    return AdapterStatus(status="loaded", lora_name=body.lora_name, message=f"adapter {body.lora_name!r} is served on {answerer.spec.base}")


@router.post("/v1/unload_lora_adapter", response_model=AdapterStatus, dependencies=[Depends(require_key)], tags=["adapters"],
             responses=documented(400, 401, 404, 422, 503))
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request):
    """Stop serving an adapter; requests already admitted for it finish first (vLLM's endpoint)."""
    await service_of(request).unload_adapter(body.lora_name)
    return AdapterStatus(status="unloaded", lora_name=body.lora_name, message=f"adapter {body.lora_name!r} is no longer served")


@router.get("/v1/sections/{section_id:path}", response_model=SectionOut, dependencies=[Depends(require_key)], tags=["citations"],
            responses=documented(401, 404, 503))
async def section(section_id: str, request: Request):
    """The whole text of a cited section (a source's `section_id`), so a citation can be checked."""
    return await service_of(request).section(section_id)


@router.post("/v1/answer", response_model=AnswerResponse, dependencies=[Depends(require_key)], responses=ERRORS)
async def answer(body: AnswerRequest, request: Request):
    """Answer a course question, each sentence citing the passages that support it, or say that
    the course notes do not cover it (`abstained`) and list the closest passages."""
    result = await service_of(request).answer(
        body.model, body.question, rag=body.rag, k=body.top_k, max_new_tokens=body.max_new_tokens,
        temperature=body.temperature, num_beams=body.num_beams, abstain=body.abstain, request_id=request_id(request),
    )
    return answer_response(result)


@router.get("/metrics", dependencies=[Depends(require_key)], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **documented(401)})
async def metrics(request: Request):
    """Prometheus metrics: requests, latency, queue depth, batch sizes, tokens."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/", include_in_schema=False)
async def root(request: Request):
    """A browser (no body) gets the page; the seed's `GET /` with `{"question": ...}` gets the answer string."""
    raw = await request.body()
    if not raw.strip():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
    check_key(request)
    try:
        seed = SeedRequest.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(422, describe_validation(e.errors()), "invalid_request") from None
    result = await service_of(request).answer(seed.model_name, seed.question, rag=True, k=3, max_new_tokens=None,
                                              temperature=None, request_id=request_id(request))
    return JSONResponse(result.answer.text)


def create_app(answerers: dict | None = None, *, loader: Loader | None = None, config: ServerConfig | None = None,
               on_load_error: Callable[[str], None] | None = None, service=None) -> FastAPI:
    """An app serving `answerers` ({name: Answerer}), or those `loader` builds in the background, or
    those a given `service` reaches (on Ray Serve: `server.scale.RemoteService`)."""
    config = config or ServerConfig()
    metrics = Metrics()
    service = service or Service(config, metrics, answerers, loader, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="aimlqa", version=aimlqa.__version__, lifespan=lifespan,
                  description="Answers AI/ML course questions, grounded in the course notes, with sources.")
    app.state.config, app.state.metrics, app.state.service = config, metrics, service
    errors.install(app)
    app.add_middleware(RequestContext, metrics=metrics)
    app.include_router(router)
    app.include_router(chat_router, responses=ERRORS)
    return app
