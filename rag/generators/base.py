"""The generator interface: prompts in, texts out, batched, with stop sequences and token counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aimlqa.settings import UserError


def is_greedy(temperature: float) -> bool:
    """Temperatures this close to 0 overflow the sampler's softmax; they mean greedy anyway."""
    return temperature < 1e-3


def beams_problem(num_beams: int, temperature: float) -> str | None:
    """Why these settings cannot decode together, or None: beam search does not sample."""
    if num_beams > 1 and not is_greedy(temperature):
        return f"num_beams={num_beams} is beam search, which does not sample: set temperature 0 (or leave it unset), or num_beams 1 to sample"
    return None


@dataclass
class GenerationConfig:
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search (greedy only); about num_beams times the decoding compute

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    def __post_init__(self):
        if self.num_beams < 1:
            raise UserError(f"num_beams must be at least 1, not {self.num_beams}")
        if problem := beams_problem(self.num_beams, self.temperature):
            raise UserError(problem)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # stop | length


class Generator(Protocol):
    context_window: int

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompts: list[str], config: GenerationConfig) -> list[Generation]: ...


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def adapter_names(adapters: list[str | None] | None, n: int, default: str | None, loaded) -> list[str | None]:
    """Per prompt, the loaded adapter it runs through (None: the base); `adapters` None means the
    back end's default adapter for every prompt. The one check of a request's adapters for every back end."""
    names = adapters if adapters is not None else [default] * n
    if len(names) != n:
        raise ValueError(f"{len(names)} adapter names for {n} prompts")
    if unknown := {a for a in names if a is not None} - set(loaded):
        raise UserError(f"adapter {sorted(unknown)[0]!r} is not loaded; loaded: {', '.join(loaded) or 'none'}")
    return names


def check_adapter_name(name: str, loaded, present: bool) -> None:
    """Loading needs a new name (`present` False), unloading a loaded one (`present` True)."""
    if present and name not in loaded:
        raise UserError(f"no adapter named {name!r} is loaded; loaded: {', '.join(loaded) or 'none'}")
    if not present and name in loaded:
        raise UserError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")


def default_config(spec, template_stop: tuple[str, ...] = (), **overrides) -> GenerationConfig:
    fields = dict(
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        repetition_penalty=spec.repetition_penalty,
        num_beams=spec.num_beams,
        stop=template_stop,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    if not is_greedy(given.get("temperature", 0)) and "num_beams" not in given:
        given["num_beams"] = 1  # sampling asked for: the model's default beam search gives way
    return GenerationConfig(**fields | given)

