"""The one trainer for every recipe: transformers' Trainer with an answer-only loss, validation by
generated answers (ROUGE on real generations), best checkpoint kept, resume and clean Ctrl-C."""

from __future__ import annotations

import copy
import csv
import json
import signal
import time
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from aimlqa.settings import UserError, ensure_dir
from finetune.loss import linear_cross_entropy
from finetune.model import adapter_autocast, base_model


def answer_only_loss(model, batch, num_items: int | None = None, grad_filter: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the answer tokens, projecting only their hidden states through the output layer.

    A causal LM's forward computes logits for every position; for Gemma 3 270M the 262k-word output
    layer is 168M of its 268M parameters, and only the answer tokens need it.
    """
    labels = batch["labels"]
    hf = base_model(model)
    if hf.config.is_encoder_decoder:
        with adapter_autocast(model):
            return model(**batch).loss
    backbone = getattr(hf, hf.base_model_prefix)
    with adapter_autocast(model):
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = labels[:, 1:]
    mask = target != -100
    cap = getattr(hf.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(hidden[:, :-1][mask], hf.get_output_embeddings(), target[mask], cap, grad_filter=grad_filter)
    return loss / (num_items if num_items else mask.sum().clamp(min=1))


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: sum(s[k].fmeasure for s in scores) / max(len(scores), 1) for k in ("rouge1", "rouge2", "rougeL")}


class StopOnSignal(TrainerCallback):
    """Ctrl-C asks for a checkpoint at the end of the current step, then a clean stop."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def install(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, *_):
        if self.stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step with a checkpoint (Ctrl-C again to abort)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop:
            control.should_save = True
            control.should_training_stop = True
        return control


class QATrainer(Trainer):
    """Trainer with the answer-only loss and generation-based validation."""

    def __init__(self, *args, answerer_factory=None, eval_questions=(), eval_references=(), head_grad_filter=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_grad_filter = head_grad_filter
        self.answerer_factory = answerer_factory
        self.eval_questions = list(eval_questions)
        self.eval_references = list(eval_references)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = int(num_items_in_batch) if num_items_in_batch is not None else None
        # accelerate autocasts by wrapping model.forward, which answer_only_loss bypasses for the backbone
        with self.accelerator.autocast():
            loss = answer_only_loss(model, inputs, n, self.head_grad_filter)
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.generated_rouge().items()}
        metrics[f"{metric_key_prefix}_samples"] = len(self.eval_questions)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def generated_rouge(self) -> dict[str, float]:
        if not self.eval_questions:
            return {}
        generate = self.answerer_factory(self.model)
        was_training = self.model.training
        self.model.eval()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.args.bf16):
                predictions = generate(self.eval_questions)
        finally:
            if was_training:
                self.model.train()
        return rouge(predictions, self.eval_references)


def write_loss_curve(log_history: list[dict], out: Path) -> None:
    rows = [{"step": h["step"], "loss": h.get("loss"), "eval_rougeL": h.get("eval_rougeL")} for h in log_history if "loss" in h or "eval_rougeL" in h]
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "eval_rougeL"])
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["loss"]) for r in rows if r["loss"] is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    evals = [(r["step"], r["eval_rougeL"]) for r in rows if r["eval_rougeL"] is not None]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="validation ROUGE-L")
        ax2.set_ylabel("ROUGE-L (generated)")
    ax.set_title("fine-tuning")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def resolve_precision(requested: str, cuda: bool) -> str:
    """Autocast on GPUs: bf16 where supported, else fp16. No whole-model autocast on CPU unless asked
    for: measured on 2 AMX cores it gained nothing over float32 (bench/finetune.py --precision), while
    LoRA's frozen base weights in bf16 (rag.generators.hf.pick_dtype) gained 1.3x. The adapters beside
    such a base run in bf16 anyway (finetune.model.adapter_autocast), whatever this returns."""
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if not cuda and requested == "fp16":
        return "no"  # fp16 autocast on CPU is slow and loses range; bf16 is the CPU's half type
    return requested


def training_arguments(recipe, out: Path, n_train: int, eval_enabled: bool) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    mp = resolve_precision(recipe.mixed_precision, cuda)
    steps_per_epoch = max(1, -(-n_train // (recipe.batch_size * recipe.grad_accum)))
    total = recipe.max_steps if recipe.max_steps > 0 else int(steps_per_epoch * recipe.epochs)
    warmup = recipe.warmup_steps or int(recipe.warmup_ratio * total)
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        learning_rate=recipe.lr,
        weight_decay=recipe.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=recipe.scheduler,
        optim=recipe.optim,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        train_sampling_strategy="group_by_length",
        eval_strategy="steps" if eval_enabled else "no",
        eval_steps=recipe.eval_every,
        save_strategy="steps",
        save_steps=recipe.eval_every,
        save_total_limit=2,
        load_best_model_at_end=eval_enabled,
        metric_for_best_model=f"eval_{recipe.best_metric}" if eval_enabled else None,
        greater_is_better=True,
        logging_steps=max(1, min(10, total // 20 or 1)),
        seed=recipe.seed,
        fp16=mp == "fp16",
        bf16=mp == "bf16",
        use_cpu=not cuda,
        report_to=[],
        remove_unused_columns=False,
        gradient_checkpointing=recipe.gradient_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def make_collator(tokenizer):
    """Dynamic padding to the longest sequence in each batch (labels padded with -100)."""
    pad_tok = copy.copy(tokenizer)
    pad_tok.padding_side = "right"
    return DataCollatorForSeq2Seq(pad_tok, model=None, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)


def last_checkpoint(out: Path) -> str | None:
    ck = out / "checkpoints"
    return get_last_checkpoint(str(ck)) if ck.is_dir() else None


RUN_MARKS = ("manifest.json", "checkpoints", "loss.csv", "train_index")  # what only a run writes


def output_dir(out: Path) -> Path:
    """The run's output dir, made if missing. A run replaces its adapter/model and checkpoints there,
    so a folder holding anything else (not a run's output) is refused rather than written into."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in RUN_MARKS):
        raise UserError(f"--out {out} holds other files, not a fine-tuning run's output; pass a new or empty directory")
    return ensure_dir(out)


def _flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        items.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return items


def guard_resume(out: Path, run: dict) -> str | None:
    """The checkpoint to resume from, only if it came from this very run (recipe, base and data).

    Resuming another run's checkpoint would load its optimizer and schedule under new settings or
    new data and mix the two without a word; so a difference is refused, naming what changed."""
    path = out / "checkpoints" / "run.json"
    checkpoint = last_checkpoint(out)
    if checkpoint and path.is_file():
        before = _flat(json.loads(path.read_text()))
        now = _flat(json.loads(json.dumps(run)))
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
        if changed:
            more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise UserError(
                f"{out} holds checkpoints of a stopped run with other settings ({'; '.join(changed[:6])}{more}); "
                f"run the same command as before to resume it, or pass another --out (or delete {out / 'checkpoints'}) to start afresh"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, run)
    return checkpoint


def save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)


def require_rows(rows: list, what: str) -> None:
    if not rows:
        raise UserError(f"no {what} examples: check --data and the split fractions")
