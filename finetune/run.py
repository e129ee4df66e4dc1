"""A fine-tuning run end to end: data → examples (rag.prompts) → Trainer → adapter + manifest → registry."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

from aimlqa import settings
from aimlqa.settings import UserError
from finetune.curve import write_loss_curve
from finetune.data import build_train_index, contexts_for, data_hashes, examples, tokenize
from finetune.interrupt import StopOnSignal
from finetune.model import check_hardware, load_for_training
from finetune.outputs import guard_resume, last_checkpoint, output_dir, save_json
from finetune.trainer import QATrainer, make_collator, training_arguments
from index.qa import load_many, split_records
from index.store import versions
from rag.answer import Answerer
from rag.generators.hf import TransformersGenerator
from rag.prompts import template_for
from rag.registry import get_spec, register


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)


def require_rows(rows: list, what: str) -> None:
    if not rows:
        raise UserError(f"no {what} examples: check --data and the split fractions")


def best_eval(state) -> dict:
    """The logged validation metrics of the kept (best) checkpoint: no second round of generation."""
    evals = [h for h in state.log_history if "eval_rougeL" in h]
    best = [h for h in evals if h.get("step") == state.best_global_step]
    return (best or evals[-1:] or [{}])[0]


def model_name(recipe) -> str:
    return recipe.name + ("-rag" if recipe.context == "rag" else "")


def default_out(recipe) -> Path:
    return settings.adapters_dir() / model_name(recipe)


def finetune(recipe, data_files: list[Path], out: Path | None = None, name: str | None = None, corpus=None, progress: bool = True) -> dict:
    """Train, keep the best checkpoint by generated ROUGE, save, register; returns the manifest."""
    import datasets

    check_hardware(recipe)
    t0 = time.perf_counter()
    out = output_dir(out or default_out(recipe))
    name = name or model_name(recipe)
    spec = get_spec(recipe.model)
    if recipe.base:
        spec = spec.model_copy(update={"base": recipe.base})
    splits = split_records(load_many(data_files), recipe.split_fractions)
    train, val = splits["train"], splits["validation"][: recipe.eval_samples]
    require_rows(train, "training")
    hashes = data_hashes(splits)
    resume = guard_resume(out, {"recipe": recipe.model_dump(mode="json"), "base": spec.base, "data": hashes})

    model, tokenizer, how = load_for_training(spec, recipe)
    retriever = None
    contexts = None
    if recipe.context == "rag":
        corpus = [settings.course_dir()] if corpus is None else list(corpus)
        retriever = build_train_index(train, out / "train_index", corpus, progress=progress)
        contexts = contexts_for(train, retriever, recipe.rag_k, recipe.drop_oracle, recipe.seed, recipe.rag_mode, recipe.drop_own_pair)
    rows = tokenize(examples(train, template_for(spec.family), tokenizer, recipe.max_length, contexts), tokenizer, recipe.max_length, spec.seq2seq)
    n_answer_tokens = sum(sum(t != -100 for t in r["labels"]) for r in rows)
    n_tokens = sum(len(r["input_ids"]) for r in rows)

    gen_tokenizer = copy.copy(tokenizer)
    if not spec.seq2seq:
        gen_tokenizer.padding_side = "left"

    def answerer_factory(m):
        generator = TransformersGenerator(spec, model=m, tokenizer=gen_tokenizer)

        def generate(questions):
            answerer = Answerer(spec, retriever, generator=generator)  # retrieving as served
            texts = []
            for i in range(0, len(questions), 16):
                batch = answerer.answer_many(questions[i : i + 16], rag=retriever is not None, k=recipe.rag_k, max_new_tokens=recipe.max_new_tokens)
                texts += [a.text for a in batch]
            return texts

        return generate

    stopper = StopOnSignal()
    args = training_arguments(recipe, out, len(rows), eval_enabled=bool(val))
    trainer = QATrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        eval_dataset=datasets.Dataset.from_list(rows[:1]) if val else None,
        data_collator=make_collator(tokenizer),
        callbacks=[stopper],
        answerer_factory=answerer_factory,
        head_grad_filter=recipe.head_grad_filter,
        eval_questions=[r.question for r in val],
        eval_references=[r.answer for r in val],
    )
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stopper.uninstall()
    write_loss_curve(trainer.state.log_history, out)
    if stopper.stop:
        return {"stopped": True, "step": trainer.state.global_step, "checkpoint": last_checkpoint(out), "out": str(out)}

    final = best_eval(trainer.state) if val else {}
    artifact = out / ("adapter" if recipe.method != "full" else "model")
    tmp = out / f".{artifact.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    if recipe.method == "full":
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(artifact, ignore_errors=True)
    tmp.rename(artifact)

    registered = dict(
        family=spec.family,
        base=str(artifact) if recipe.method == "full" else spec.base,
        adapter=None if recipe.method == "full" else str(artifact),
        context_window=spec.context_window,
        load_in_4bit=spec.load_in_4bit,
        max_new_tokens=spec.max_new_tokens,
        description=f"{recipe.name} fine-tuned ({how}, context={recipe.context})",
    )
    manifest = {
        "name": name,
        "recipe": recipe.model_dump(),
        "method": how,
        "base": spec.base,
        "data": [str(p) for p in data_files],
        "split_hashes": hashes,
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "train_index": retriever.manifest_hash if retriever else None,
        "train_tokens": n_tokens,
        "answer_tokens": n_answer_tokens,
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "wall_s": elapsed(t0),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "final_metrics": final,
        "registered": registered,
        "versions": versions(),
    }
    save_json(out / "manifest.json", manifest)
    register(name, **registered)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return manifest
