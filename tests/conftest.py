"""Shared fixtures: a small course corpus, the packaged embedding model and a built index."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from aimlqa import settings  # noqa: E402

# Tiny random-weight generators answer gibberish that no passage supports, so with the shipped
# thresholds every grounded answer would abstain. Tests run without abstention, except those that
# test it (with thresholds they set); tests/test_citations.py checks the shipped file itself.
_NO_ABSTENTION = Path(__file__).with_name("no_abstention.json")
os.environ.setdefault("AIMLQA_THRESHOLDS", str(_NO_ABSTENTION))

GROUP18 = settings.group18_dir()
if not GROUP18.is_dir():  # a clone elsewhere (CI) still finds the developers' copy of this workplace
    GROUP18 = Path("/work/shared/data/group18")

NOTES = {
    "unit1/gradient-descent.md": """# Gradient descent

Gradient descent minimises a loss by stepping against its gradient.

## The update rule

Each step moves the weights by the learning rate times the gradient: w <- w - lr * dL/dw.
A learning rate that is too large makes the loss diverge; one that is too small makes training slow.

## Stochastic and mini-batch variants

Stochastic gradient descent estimates the gradient from one example, mini-batch gradient descent
from a small batch. The noise of small batches can help escape sharp minima.
""",
    "unit2/dropout.md": """# Dropout

## How dropout works

During training dropout sets each activation to zero with probability p and scales the rest by 1/(1-p),
so a network cannot rely on any single unit. At test time every unit is kept.

## Why dropout regularises

Dropout trains an ensemble of thinned networks that share weights, which reduces overfitting.
""",
    "unit3/convolution.md": """# Convolution

## Kernels and feature maps

A convolutional layer slides small kernels over the image; each kernel produces one feature map.
Weights are shared across positions, so a convolution has far fewer parameters than a dense layer.

## Output size

For input size n, kernel k, padding p and stride s the output size is floor((n + 2p - k) / s) + 1.
""",
}

QA = [
    {"id": "t-1", "question": "What does the learning rate control in gradient descent?", "answer": "The learning rate scales each gradient step; too large diverges, too small is slow.", "unit": "1", "gold": ["unit1/gradient-descent#the-update-rule"]},
    {"id": "t-2", "question": "How does dropout reduce overfitting?", "answer": "Dropout zeroes activations at random so the network trains an ensemble of thinned networks.", "unit": "2", "gold": ["unit2/dropout#why-dropout-regularises"]},
    {"id": "t-3", "question": "How do you compute the output size of a convolution?", "answer": "The output size is floor((n + 2p - k) / s) + 1 for input n, kernel k, padding p and stride s.", "unit": "3", "gold": ["unit3/convolution#output-size"]},
]


@pytest.fixture(scope="session")
def course_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("course")
    for rel, text in NOTES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


@pytest.fixture(scope="session")
def embedder():
    from index.embed import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, course_dir, qa_file, embedder) -> Path:
    from index.retriever import build_index
    from index.store import BuildConfig

    out = tmp_path_factory.mktemp("idx") / "course"
    build_index([course_dir, qa_file], out, BuildConfig(chunk_size=64, chunk_overlap=8), progress=False, embedder=embedder)
    return out


@pytest.fixture(scope="session")
def retriever(built_index, embedder):
    from index.retriever import Retriever

    return Retriever.load(built_index, embedder=embedder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny import FAMILIES, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture()
def aimlqa_home(tmp_path, monkeypatch) -> Path:
    """An empty AIMLQA_HOME (and user registry) per test."""
    monkeypatch.setenv("AIMLQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AIMLQA_MODELS", raising=False)
    return tmp_path / "home"
