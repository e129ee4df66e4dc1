"""Request and response bodies. Their constraints are the first line of validation and are
published in `/openapi.json`; limits that depend on a model (tokens) are checked by the service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from index.retriever import Passage
from rag.attribution import Sentence
from rag.generators.base import beams_problem
from server.config import MAX_BEAMS, MAX_NEW_TOKENS, MAX_QUESTION_CHARS, MAX_TOP_K



def model_field():
    return Field(None, max_length=200, description="A served model (see GET /v1/models); default: the server's default model")


def check_question(question: str) -> str:
    """Non-blank Unicode text: a lone surrogate would break the tokenizer deep inside generation."""
    if not question.strip():
        raise ValueError("question is empty; ask something")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("question is not valid Unicode text") from None
    return question


MIN_TEMPERATURE = 0.01


def check_temperature(t: float | None) -> float | None:
    """0 is greedy; a positive value so small that float32 makes it 0 would divide logits by zero."""
    if t is not None and 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return t


ABSTAIN_DOC = ("Say \"not in the course notes\" (with the closest passages as sources) when no passage is close to the question "
               "or the passages do not support the answer; false returns the model's answer anyway, its unsupported sentences marked")


class _Question(BaseModel):
    question: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)

    @field_validator("question")
    @classmethod
    def question_is_text(cls, question: str) -> str:
        return check_question(question)


class AnswerRequest(_Question):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    model: str | None = model_field()
    rag: bool = Field(True, description="Ground the answer in passages retrieved from the course index")
    top_k: int = Field(3, ge=1, le=MAX_TOP_K, description="Passages to retrieve")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Generation limit; default: the model's")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy, else 0.01..2; default: the model's")
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS, description="Beam search width, 1 = greedy (about num_beams x the time); default: the model's")
    abstain: bool = Field(True, description=ABSTAIN_DOC)

    _temperature = field_validator("temperature")(check_temperature)

    @model_validator(mode="after")
    def beams_are_greedy(self):
        if problem := beams_problem(self.num_beams or 1, self.temperature or 0):
            raise ValueError(problem)
        return self


class SeedRequest(_Question):
    """The seed's `GET /` body; `model_name` must name a served model (never a hub id or a path)."""

    model_name: str | None = model_field()


ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body, so tools written for vLLM's `/v1/load_lora_adapter` work here."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(..., pattern=ADAPTER_NAME, description="The model name requests will use (letters, digits, . _ -)")
    lora_path: str = Field(..., min_length=1, max_length=1000,
                           description="A directory `aimlqa finetune` wrote, relative to the server's adapters directory or absolute inside it")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(..., min_length=1, max_length=200)
    lora_int_id: int | None = Field(None, description="Accepted for vLLM compatibility and ignored")


class AdapterStatus(BaseModel):
    status: Literal["loaded", "unloaded"]
    lora_name: str
    message: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    retrieve_ms: float
    generate_ms: float
    attribute_ms: float = Field(0.0, description="Attributing the answer's sentences to its sources")
    queue_ms: float = Field(description="Time waiting for a batch slot")


class AnswerResponse(BaseModel):
    answer: str = Field(description="The answer; when `abstained`, the notice saying why there is none")
    cited_answer: str = Field(description="`answer` with a marker after each sentence: [n] for sources[n-1] supporting it, [unsupported] when none does")
    sentences: list[Sentence] = Field(description="Each sentence of `answer`: its span (start, end), support and the citations (source n, chunk_id, section_id, excerpt, score) behind its marker")
    support: float | None = Field(description="How well the sources support the answer: the mean over sentences of their best source's score (null ungrounded)")
    relevance: float | None = Field(description="How close the best source is to the question (cosine; null ungrounded)")
    abstained: Literal["no_relevant_passage", "unsupported"] | None = Field(
        description="null when answered; else why not: no passage is close to the question, or the passages do not support the generated answer")
    raw_answer: str | None = Field(description="When abstained after generating: the model's own answer, unchecked")
    sources: list[Passage] = Field(description="The retrieved passages: text, source file, section, section_id (the citation id the CLI prints), score, chunk_id")
    model: str
    rag: bool = Field(description="Whether retrieved passages grounded this answer")
    usage: Usage
    timings: Timings


class SectionOut(BaseModel):
    section_id: str = Field(description="As in an answer's sources: unitN/topic#section for the course notes")
    source: str = Field(description="The file it comes from, relative to the indexed folder")
    title: str
    section: str = Field(description="The section's heading (a Q&A pair: its question)")
    text: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "aimlqa"
    family: str
    backend: str
    description: str = ""
    parent: str | None = Field(None, description="For an adapter: the base model it runs on (vLLM's field)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- OpenAI-compatible chat completions -------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's request; other OpenAI fields are accepted and ignored. The question is the last
    user message (earlier turns are not used). `rag` and `top_k` are this server's extensions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = model_field()
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy, else 0.01..2")
    n: int = Field(1, ge=1, le=1, description="Only one choice is generated")
    rag: bool = Field(True, description="aimlqa extension: false answers without retrieval (send it in `extra_body`)")
    top_k: int = Field(3, ge=1, le=MAX_TOP_K, description="aimlqa extension: passages to retrieve")
    abstain: bool = Field(True, description="aimlqa extension: " + ABSTAIN_DOC)

    _temperature = field_validator("temperature")(check_temperature)

    @model_validator(mode="after")
    def _has_question(self) -> "ChatRequest":
        question = self.question()
        if not question.strip():
            raise ValueError("question is empty: messages need a user message with text; the last one is the question")
        if len(question) > MAX_QUESTION_CHARS:
            raise ValueError(f"the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
        check_question(question)
        return self

    def question(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        return users[-1].text() if users else ""


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    sources: list[Passage] = Field(description="aimlqa extension: the passages that grounded the answer; a marker [n] in the content is sources[n-1]")
    citations: list[Sentence] = Field(description="aimlqa extension: each sentence of the answer (spans without markers) with the citations behind its marker")
    abstained: Literal["no_relevant_passage", "unsupported"] | None = Field(description="aimlqa extension: see POST /v1/answer")
