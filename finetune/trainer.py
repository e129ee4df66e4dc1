"""The one trainer for every recipe: transformers' Trainer with the answer-only loss (finetune.loss),
validation by generated answers (ROUGE on real generations), the best checkpoint kept. A run's
folder and resume guard are in finetune.outputs, Ctrl-C in finetune.interrupt, its curve in
finetune.curve."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from finetune.loss import answer_only_loss


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Validation ROUGE, by the evaluator's own definition: a checkpoint is chosen by what
    `aimlqa eval` will report."""
    from eval.metrics import rouge_scores

    return {k: v for k, v in rouge_scores(predictions, references).items() if k in ("rouge1", "rouge2", "rougeL")}


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
