"""OpenAI-compatible `POST /v1/chat/completions`, so the official client and tools built on it work.

Answers are grounded by default and cite their sources: the content carries a marker after each
sentence ("[1]": `sources[0]` supports it; "[unsupported]": no source does), and the extension
fields `sources`, `citations` (per sentence: the passages, excerpts and scores) and `abstained`
say more. The extension request fields `rag` (false turns retrieval off), `top_k` and `abstain`
(false: the model's answer even when the notes do not support it) go in the client's `extra_body`.

With `stream: true` the reply comes as server-sent events in OpenAI's chunk format, as it is
generated: the batch's decoding loop hands each row's text to its request after every step
(`rag.generators.hf.RowStreamer`), `StreamCleaner` passes on what the final cleaning will keep,
and `CitedStream` adds each sentence's marker as the next sentence begins, so the pieces join to
the non-streamed content. A streamed answer that turns out unsupported cannot be taken back: the
stream then ends with the notice, and the finish chunk has `abstained`. Until the first piece,
an error is a plain HTTP status; after it, an error event ends the stream.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.auth import require_key
from server.errors import ApiError, request_id
from server.schemas import ChatChoice, ChatCompletion, ChatRequest, ChatResponseMessage, ChatUsage
from server.service import Result

router = APIRouter(tags=["openai"])
# Before OpenAPI 3.2 a text/event-stream `schema` describes one event: its `data` line holds a
# JSON chat.completion.chunk, or `[DONE]` at the end.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chat.completion.chunk, or [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}}}
SSE_DOC = {"text/event-stream": {"schema": SSE_EVENT, "description": "with stream: true, chat.completion.chunk events, then [DONE]"}}


def completion(result: Result, cid: str, created: int) -> ChatCompletion:
    a = result.answer
    return ChatCompletion(
        id=cid,
        created=created,
        model=a.model,
        choices=[ChatChoice(message=ChatResponseMessage(content=a.cited_text), finish_reason=result.finish_reason)],
        usage=ChatUsage(prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens, total_tokens=a.prompt_tokens + a.completion_tokens),
        sources=a.sources,
        citations=a.attribution.sentences if a.attribution and not a.abstained else [],
        abstained=a.abstained,
    )


class Stream:
    """OpenAI's chunk events for one completion: a role chunk, content chunks, a finish chunk with the
    sources, citations and abstention, [usage], [DONE]."""

    def __init__(self, cid: str, created: int, model: str):
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def event(self, delta: dict, finish: str | None = None, **extra) -> str:
        body = self.head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | extra
        return f"data: {json.dumps(body)}\n\n"

    def tail(self, full: ChatCompletion, include_usage: bool):
        yield self.event({}, full.choices[0].finish_reason, **full.model_dump(mode="json", include={"sources", "citations", "abstained"}))
        if include_usage:
            yield f"data: {json.dumps(self.head | {'choices': [], 'usage': full.usage.model_dump()})}\n\n"
        yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=[Depends(require_key)],
             responses={200: {"content": SSE_DOC}})
async def chat_completions(body: ChatRequest, request: Request):
    """Answer the last user message; grounded unless `rag` is false. With `stream: true` the answer's
    text arrives as it is generated."""
    rid, created, service = request_id(request), int(time.time()), request.app.state.service
    ask = dict(rag=body.rag, k=body.top_k, abstain=body.abstain, max_new_tokens=body.max_completion_tokens or body.max_tokens,
               temperature=body.temperature, request_id=rid)
    if not body.stream:
        return completion(await service.answer(body.model, body.question(), **ask), f"chatcmpl-{rid}", created)
    pieces: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(service.answer(body.model, body.question(), on_text=pieces.put_nowait, **ask))
    # until the first piece, a failure (unknown model, full queue, bad length) is still a plain HTTP error
    first = asyncio.create_task(pieces.get())
    await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
    if first.done():
        opening = first.result()
    else:
        first.cancel()
        task.result()  # raises the request's ApiError; else it finished with an empty answer
        opening = ""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        stream = Stream(f"chatcmpl-{rid}", created, body.model or service.default_model)
        yield stream.event({"role": "assistant", "content": opening})
        while not (task.done() and pieces.empty()):
            getter = asyncio.create_task(pieces.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
            elif piece := getter.result():
                yield stream.event({"content": piece})
        try:
            full = completion(task.result(), f"chatcmpl-{rid}", created)
        except ApiError as e:  # the answer failed after the stream began: say so in the stream
            yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.code, 'request_id': rid}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        for chunk in stream.tail(full, include_usage):
            yield chunk

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
