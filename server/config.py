"""Server settings: batching, the queue bound, time limits, request limits and API keys."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Hard limits, published in the OpenAPI schema; a model's context window may refuse earlier.
MAX_QUESTION_CHARS = 2000
MAX_TOP_K = 20
MAX_BEAMS = 8  # beam search costs about num_beams x the decoding time
MAX_NEW_TOKENS = 1024


def keys_from_env() -> frozenset[str]:
    """`AIMLQA_API_KEYS`, comma-separated; empty means the API is open."""
    return frozenset(k.strip() for k in os.environ.get("AIMLQA_API_KEYS", "").split(",") if k.strip())


@dataclass
class ServerConfig:
    max_batch_size: int = 8  # questions per generate call
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    queue_size: int = 256  # requests waiting per model; beyond it, 503 + Retry-After
    request_timeout_s: float = 120.0  # queueing + generation; beyond it, 504
    max_question_tokens: int = 512  # in the model's own tokens (characters: MAX_QUESTION_CHARS)
    default_model: str | None = None  # when a request names none; default: the first served
    api_keys: frozenset[str] = field(default_factory=keys_from_env)
    adapters_root: Path | None = None  # where load_lora_adapter may read; default $AIMLQA_HOME/finetuned

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1:
            raise ValueError("max_batch_size and queue_size must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        self.api_keys = frozenset(self.api_keys)
        if self.adapters_root is None:
            from aimlqa import settings

            self.adapters_root = settings.adapters_dir()
        self.adapters_root = Path(self.adapters_root)
