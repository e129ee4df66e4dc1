"""Fine-tuning throughput for `gemma-270m-lora` on CPU: our pipeline against the seed's.

ours: dynamic padding, length-grouped batches, loss on answer tokens only, the output layer applied
      only to answer positions (finetune.loss.answer_only_loss).
seed: every example padded to 256 tokens, loss over the whole sequence through full logits.
Same data (group18 train split, the recipe's prompts), same model, batch size and optimizer. Each
variant runs in its own process (for its peak memory). Ours is timed over a whole epoch: its steps
differ in length, and a few sampled ones misstate the epoch (six picked from the shorter half once
read 9.8x where the whole epoch reads far less). The seed's steps all cost the same (every example
padded to 256), so its epoch is the mean of `--steps` steps spread over the epoch times the steps
in an epoch. MFU is model FLOPs (2 x frozen parameters x tokens forward, the same again backward
for the layers the backward pass reaches) over the machine's matmul FLOP/s, measured in the same run.
The FLOPs are those of the exact computation: with the output layer's gradient filter
(`head_grad_filter`) most of that layer's backward half is skipped but still counted.

    python bench/finetune.py [--steps 6] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import verdict, write  # noqa: E402  (sets sys.path)

from aimlqa import settings  # noqa: E402

GROUP18 = settings.group18_dir()  # developers' data, not shipped


# (result key, pipeline, recipe overrides); ours first, the seed last (see main)
RUNS = [
    ("ours", "ours", []),
    ("ours_exact_head", "ours", ["head_grad_filter=0"]),  # the output layer's full gradient
    ("ours_every_layer", "ours", ["head_grad_filter=0", "lora.top_layers=null", "lora.dropout=0.05"]),  # before top_layers
    ("seed", "seed", []),
]


def matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's matmul FLOP/s in the dtype the frozen base weights train in."""
    import torch

    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def child(variant: str, steps: int, batch: int, precision: str = "auto", overrides: list[str] = ()) -> dict:
    import torch
    import torch.nn.functional as F

    from finetune.data import examples, tokenize
    from finetune.model import adapter_autocast, load_for_training
    from finetune.recipe import load_recipe
    from finetune.loss import answer_only_loss
    from finetune.trainer import make_collator
    from index.qa import load_qa, select_split
    from rag.prompts import template_for
    from rag.registry import get_spec

    torch.manual_seed(0)
    recipe = load_recipe("gemma-270m-lora", overrides)
    spec = get_spec(recipe.model)
    if precision != "auto":  # auto: frozen base weights in bf16 on CPUs with native bf16 (LoRA weights stay float32)
        spec = spec.model_copy(update={"dtype": "float32"})
    model, tok, _ = load_for_training(spec, recipe)
    train = select_split(load_qa(GROUP18 / "dev.jsonl"), "train")
    rows = tokenize(examples(train, template_for(spec.family), tok, recipe.max_length), tok, recipe.max_length, False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    hf = model.get_base_model()
    n_head = hf.get_output_embeddings().weight.numel()
    frozen_body = [(n, p) for n, p in hf.named_parameters() if "embed_tokens" not in n and "lora_" not in n]
    n_body = sum(p.numel() for _, p in frozen_body)
    # the backward pass runs from the top down to the lowest adapted layer (lora.top_layers)
    layer_of = lambda n: int(n.split(".layers.")[1].split(".")[0]) if ".layers." in n else None
    lowest = min(layer_of(n) for n, p in hf.named_parameters() if p.requires_grad)
    n_back = sum(p.numel() for n, p in frozen_body if layer_of(n) is None or layer_of(n) >= lowest)

    if variant == "ours":
        # length-grouped: batches of similar length, as the trainer's group_by_length sampler makes them
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        batches = [[rows[i] for i in order[j : j + batch]] for j in range(0, len(order), batch)]
        collate = make_collator(tok)
        pick = [batches[len(batches) // 2]] + batches  # a warm-up step, then the whole epoch
    else:
        pad = lambda r: r["input_ids"][:256] + [tok.pad_token_id] * (256 - len(r["input_ids"][:256]))
        batches = [rows[j : j + batch] for j in range(0, len(rows), batch)]
        pick = [batches[k * (len(batches) - 1) // steps] for k in range(steps + 1)]

    # LoRA: the base weights are frozen, so per token 2N forward + 2N for the input gradients of the
    # layers the backward pass reaches (no weight gradients; the adapters' own FLOPs are under 1%)
    flops_of = lambda tokens, head_tokens: 2 * (n_body + n_back) * tokens + 4 * n_head * head_tokens
    times, tokens, flops = [], 0, 0.0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast")
    for k, b in enumerate(pick):
        t = time.perf_counter()
        autocast.__enter__()
        if variant == "ours":
            enc = collate(b)
            loss = answer_only_loss(model, enc, grad_filter=recipe.head_grad_filter)
            n_tok, n_ans = int(enc["attention_mask"].sum()), int((enc["labels"] != -100).sum())
            step_flops = flops_of(enc["input_ids"].numel(), n_ans)
        else:
            ids = torch.tensor([pad(r) for r in b])
            mask = (ids != tok.pad_token_id).long()
            labels = ids.masked_fill(mask == 0, -100)
            with adapter_autocast(model):  # the adapters' precision as ours, so only the pipelines differ
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
            n_tok = int(mask.sum())
            step_flops = flops_of(ids.numel(), ids.numel())
        autocast.__exit__(None, None, None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if k > 0:  # the first step warms up
            times.append(time.perf_counter() - t)
            tokens += n_tok
            flops += step_flops
    step_s = sum(times) / len(times)
    steps_per_epoch = len(batches)
    return {
        "variant": variant,
        "recipe_overrides": list(overrides),
        "precision": precision,
        "base_dtype": str(hf.dtype).removeprefix("torch."),
        "examples": len(rows),
        "batch": batch,
        "steps_measured": len(times),
        "epoch_measured": len(times) == steps_per_epoch,
        "mean_step_s": round(step_s, 3),
        "epoch_s": round(step_s * steps_per_epoch, 1),
        "tokens_per_s": round(tokens / sum(times), 1),
        "model_flops_per_s": flops / sum(times),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="seed steps to time (ours: a whole epoch)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--child", choices=["ours", "seed"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for a child")
    ap.add_argument("--precision", choices=["auto", "fp32", "autocast"], default="auto",
                    help="auto: the trainer's choice; fp32: float32 weights; autocast: float32 weights under bf16 autocast")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.precision, args.overrides)))
        return
    # the probe first and ours before the seed: a child that just freed 13 GB leaves the kernel
    # reclaiming memory for a while, which once halved the probe's reading
    from rag.generators.hf import pick_dtype

    peak = matmul_flops(str(pick_dtype("cpu")).removeprefix("torch."))  # the frozen base's dtype
    runs = {}
    for key, variant, overrides in RUNS:
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--batch", str(args.batch)]
        out = subprocess.run(cmd + [f"--set={o}" for o in overrides], capture_output=True, text=True, check=True)
        runs[key] = json.loads(out.stdout.strip().splitlines()[-1])
    for run in runs.values():
        run["mfu"] = round(run.pop("model_flops_per_s") / peak, 4)
    result = {
        "model": "gemma-270m-lora",
        "data": "group18 dev.jsonl, train split",
        "matmul_gflops": round(peak / 1e9, 1),
        "matmul_dtype": runs["ours"]["base_dtype"],
        "seed": runs["seed"],
        "ours": runs["ours"],
        **{key: runs[key] for key, _, _ in RUNS if key not in ("ours", "seed")},
        "epoch_speedup": round(runs["seed"]["epoch_s"] / runs["ours"]["epoch_s"], 2),
        "target_epoch_speedup": 10.0,
        # each against ours, epoch time: what the gradient filter, the fewer layers and all of it add
        "speedup_over": {key: round(runs[key]["epoch_s"] / runs["ours"]["epoch_s"], 2) for key, _, _ in RUNS if key != "ours"},
    }
    write("finetune", result)
    print(json.dumps(result, indent=2))
    print(verdict("epoch time, the seed's pipeline / ours", result["epoch_speedup"], result["target_epoch_speedup"]))


if __name__ == "__main__":
    main()
