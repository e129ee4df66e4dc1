"""A running aimlqa server seen from outside: its models, its adapters, and answers through its REST
API, so that what is evaluated or registered is exactly what students get."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aimlqa.settings import UserError
from index.retriever import Passage
from rag.answer import Answer

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    return os.environ.get("AIMLQA_SERVER", DEFAULT_URL)


class ServerClient:
    """httpx against one server; `AIMLQA_API_KEY` (or `api_key`) is sent as the bearer token."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 300.0, retries: int = 5):
        import httpx

        self.url = (url or default_url()).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("AIMLQA_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retries = retries

    def request(self, method: str, path: str, **kw) -> dict:
        """One call; a 503 with Retry-After (queue full, still loading) is retried; any other error is
        a UserError carrying the server's own message."""
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.HTTPError as e:
                raise UserError(f"cannot reach the aimlqa server at {self.url} ({type(e).__name__}: {e}); "
                                "start it with `make run` / `aimlqa serve`, or pass --server URL") from None
            if r.status_code == 503 and "retry-after" in r.headers and attempt < self.retries:
                time.sleep(min(float(r.headers["retry-after"]), 10.0))
                continue
            if r.status_code >= 400:
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:300]
                raise UserError(f"{self.url}{path}: {r.status_code}: {message}")
            return r.json()
        raise AssertionError("unreachable")

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models")["data"]

    def load_adapter(self, name: str, path: str | Path) -> dict:
        """A local directory that exists is sent as its absolute path (the server checks it lies
        under its adapters directory); anything else is sent as given, relative to that directory."""
        local = Path(path).expanduser()
        sent = str(local.resolve()) if local.exists() else str(path)
        return self.request("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": sent})

    def unload_adapter(self, name: str) -> dict:
        return self.request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    def answer(self, body: dict) -> dict:
        return self.request("POST", "/v1/answer", json=body)


class RemoteAnswerer:
    """The Answerer interface over a server's `/v1/answer`: a batch is sent as concurrent requests,
    which the server batches again (across adapters) as it does for students."""

    retrieval_only = False
    generator = None

    def __init__(self, client: ServerClient, model: str, concurrency: int = 16):
        self.client, self.model, self.concurrency = client, model, concurrency
        self.retriever = None  # the server retrieves from its own index

    def answer_many(self, questions: list[str], rag: bool = True, k: int = 3, mode: str | None = None,
                    max_new_tokens: int | None = None, temperature: float | None = None, num_beams: int | None = None,
                    abstain: bool = True, **_) -> list[Answer]:
        base = {"model": self.model, "rag": rag, "top_k": k, "max_new_tokens": max_new_tokens, "temperature": temperature, "num_beams": num_beams,
                "abstain": abstain}
        base = {key: v for key, v in base.items() if v is not None}
        with ThreadPoolExecutor(min(self.concurrency, max(len(questions), 1))) as pool:
            replies = list(pool.map(lambda q: self.client.answer(base | {"question": q}), questions))
        return [to_answer(r) for r in replies]


def to_answer(reply: dict) -> Answer:
    return Answer(
        text=reply["answer"],
        sources=[Passage(**s) for s in reply["sources"]],
        model=reply["model"],
        rag=reply["rag"],
        prompt_tokens=reply["usage"]["prompt_tokens"],
        completion_tokens=reply["usage"]["completion_tokens"],
        timings={k: reply["timings"][k] for k in ("retrieve_ms", "generate_ms")},
        abstained=reply.get("abstained"),
        raw_text=reply.get("raw_answer"),
    )
