"""OpenAI-compatible `POST /v1/chat/completions`, so the official client and tools built on it work.

Answers are grounded by default; the extension fields `rag` (false turns retrieval off) and
`top_k` go in the client's `extra_body`. With `stream: true` the reply comes as server-sent
events in OpenAI's chunk format. Generation is batched across requests, so the answer is
streamed once it is generated (a chunk per word), not token by token; an error therefore still
arrives as a proper HTTP status rather than in the middle of a stream.
"""

from __future__ import annotations

import json
import re
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.auth import require_key
from server.errors import request_id
from server.schemas import ChatChoice, ChatCompletion, ChatRequest, ChatResponseMessage, ChatUsage
from server.service import Result

router = APIRouter(tags=["openai"])
# Before OpenAPI 3.2 a text/event-stream `schema` describes one event: its `data` line holds a
# JSON chat.completion.chunk, or `[DONE]` at the end.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chat.completion.chunk, or [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}}}
SSE_DOC = {"text/event-stream": {"schema": SSE_EVENT, "description": "with stream: true, chat.completion.chunk events, then [DONE]"}}


def _words(text: str) -> list[str]:
    """Pieces that join back to exactly the text."""
    return re.findall(r"\s*\S+|\s+", text)


def completion(result: Result, cid: str, created: int) -> ChatCompletion:
    a = result.answer
    return ChatCompletion(
        id=cid,
        created=created,
        model=a.model,
        choices=[ChatChoice(message=ChatResponseMessage(content=a.text), finish_reason=result.finish_reason)],
        usage=ChatUsage(prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens, total_tokens=a.prompt_tokens + a.completion_tokens),
        sources=a.sources,
    )


def chunks(full: ChatCompletion, include_usage: bool):
    """The completion as OpenAI's stream: a role chunk, content chunks, a finish chunk, [usage], [DONE]."""
    head = {"id": full.id, "object": "chat.completion.chunk", "created": full.created, "model": full.model}

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        body = head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | extra
        return f"data: {json.dumps(body)}\n\n"

    yield event({"role": "assistant", "content": ""})
    for word in _words(full.choices[0].message.content):
        yield event({"content": word})
    yield event({}, full.choices[0].finish_reason, sources=full.model_dump(include={"sources"})["sources"])
    if include_usage:
        yield f"data: {json.dumps(head | {'choices': [], 'usage': full.usage.model_dump()})}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=[Depends(require_key)],
             responses={200: {"content": SSE_DOC}})
async def chat_completions(body: ChatRequest, request: Request):
    """Answer the last user message; grounded unless `rag` is false."""
    rid = request_id(request)
    result = await request.app.state.service.answer(
        body.model, body.question(), rag=body.rag, k=body.top_k, max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature, request_id=rid,
    )
    full = completion(result, f"chatcmpl-{rid}", int(time.time()))
    if not body.stream:
        return full
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(chunks(full, include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
