"""Every recipe's family trains a few steps on a tiny model, saves, registers, reloads and answers."""

from __future__ import annotations

import pytest
import torch

from aimlqa.settings import UserError
from finetune.recipe import load_recipe
from tests.tiny import FAMILIES, FAST, qa_rows

RECIPE_OF = {"gpt2": "gpt2-lora", "bart": "bart-large-xsum", "mistral": "gpt2-lora", "llama": "gpt2-lora", "gemma3": "gemma-270m-lora"}


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_trains_saves_registers_and_answers(family, tiny_models, tmp_path, aimlqa_home):
    from finetune.run import finetune
    from rag.answer import Answerer
    from rag.registry import get_spec, register

    register(f"tiny-{family}", family=family, base=str(tiny_models[family]), context_window=256, max_new_tokens=8)
    targets = {"gpt2": "[c_attn]", "mistral": "[q_proj,v_proj]", "llama": "[q_proj,v_proj]", "gemma3": "[q_proj,v_proj]"}
    extra = [f"lora.target_modules={targets[family]}"] if family in targets else []
    if family == "gemma3":  # its recipe adapts the top 12 layers; the tiny model has 2
        extra.append("lora.top_layers=1")
    recipe = load_recipe(RECIPE_OF[family], FAST + extra + [f"model=tiny-{family}"])
    before = {k: v.clone() for k, v in Answerer(get_spec(f"tiny-{family}")).generator.model.state_dict().items()}
    m = finetune(recipe, [qa_rows(tmp_path)], tmp_path / "out", name=f"tuned-{family}", progress=False)
    assert m["steps"] == 3 and m["answer_tokens"] < m["train_tokens"]
    assert set(m["final_metrics"]) >= {"eval_rouge1", "eval_rougeL"} and m["split_hashes"]["train"]
    assert (tmp_path / "out" / "loss.csv").read_text().startswith("step,loss") and (tmp_path / "out" / "loss.png").is_file()
    spec = get_spec(f"tuned-{family}")
    answerer = Answerer(spec)
    after = answerer.generator.model
    if recipe.method == "full":
        assert spec.adapter is None and any(not torch.equal(before[k], v) for k, v in after.state_dict().items() if k in before)
    else:
        assert spec.adapter and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
        # the adapter answers, and it is the trained one: peft starts lora_B at zero, training moved it
        assert answerer.adapter == f"tuned-{family}"
        assert any(w.abs().sum() > 0 for n, w in after.named_parameters() if "lora_B" in n)
    assert m["final_metrics"]["eval_rougeL"] == m["best_metric"]  # the kept checkpoint is the best one
    a = answerer.answer("What is dropout number 3?", rag=False)
    assert 0 < a.prompt_tokens and a.completion_tokens <= 8 and a.model == f"tuned-{family}"


def test_answer_only_loss_ignores_prompt_tokens(tiny_models):
    """Changing prompt labels must not move the loss; changing answer labels must, and it equals the
    full-logits loss restricted to the answer tokens."""
    from transformers import AutoModelForCausalLM

    from finetune.loss import answer_only_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"]).eval()
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 2]])
    labels = torch.tensor([[-100, -100, -100, -100, 13, 14, 15, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        ours = answer_only_loss(model, batch)
        reference = model(input_ids=ids, labels=labels).loss
        changed_prompt = answer_only_loss(model, {**batch, "input_ids": torch.tensor([[1, 10, 11, 12, 13, 14, 15, 2]])})
        other = answer_only_loss(model, {**batch, "labels": torch.tensor([[-100, -100, -100, -100, 20, 21, 22, 2]])})
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours, changed_prompt) and not torch.allclose(ours, other)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_frozen_head_cross_entropy_matches_the_plain_one(softcap):
    """The reused-buffer cross-entropy (several row chunks here) gives F.cross_entropy's loss and
    input gradient; a trainable head takes the plain path and still gets its own gradient."""
    from finetune.loss import linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    target = torch.randint(0, 300, (23,))
    ours = linear_cross_entropy(hidden, head, target, softcap, rows=5)
    (g_ours,) = torch.autograd.grad(2 * ours, hidden)
    logits = head(hidden)
    logits = torch.tanh(logits / softcap) * softcap if softcap else logits
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    (g_plain,) = torch.autograd.grad(2 * plain, hidden)
    assert torch.allclose(ours, plain, atol=1e-4) and torch.allclose(g_ours, g_plain, atol=1e-6)
    low = torch.nn.Linear(16, 300, bias=False).to(torch.bfloat16).requires_grad_(False)  # a bf16 frozen base
    (g_low,) = torch.autograd.grad(linear_cross_entropy(hidden, low, target, softcap, rows=5), hidden)
    assert g_low.dtype == hidden.dtype and torch.isfinite(g_low).all()
    head.weight.requires_grad_(True)
    linear_cross_entropy(hidden, head, target, softcap, rows=5).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_frozen_head_cross_entropy_is_exact_where_the_target_probability_underflows(softcap):
    """The loss is read off the in-place softmax as -log p(target); where p underflows float32
    (a logit gap past ~100) the row falls back to the exact log-sum-exp, so the loss stays finite
    and equal to F.cross_entropy's."""
    from finetune.loss import linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(12, 16)
    hidden[::3] *= 200  # every third row: a huge logit gap
    logits = head(hidden)
    logits = torch.tanh(logits / softcap) * softcap if softcap else logits
    target = logits.argmin(dim=1)  # the least likely word
    probs = logits.softmax(dim=1)
    assert (probs[torch.arange(12), target][::3] < 1e-30).all()  # those rows' target underflows
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    hidden.requires_grad_(True)
    ours = linear_cross_entropy(hidden, head, target, softcap, rows=5)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    assert torch.isfinite(ours) and torch.allclose(ours, plain, rtol=1e-5)
    assert torch.isfinite(g_ours).all()


def test_adapter_autocast_runs_lora_in_bf16_and_keeps_float32_weights(tiny_models, monkeypatch):
    """Beside a frozen bf16 base on the CPU the adapters' matmuls run in bf16 (no float32 round trip
    of their inputs), their weights and gradients stay float32, the gradients match peft's float32
    path to bf16 precision, and peft's own input cast is back on afterwards."""
    import contextlib

    import finetune.loss as trainer
    from finetune.model import load_for_training
    from rag.registry import ModelSpec

    spec = ModelSpec(name="tiny-gemma3", family="gemma3", base=str(tiny_models["gemma3"]), dtype="bfloat16")
    model, _, _ = load_for_training(spec, load_recipe("gemma-270m-lora", ["lora.target_modules=[q_proj,v_proj]", "lora.top_layers=2"]))
    torch.manual_seed(0)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # peft starts B at zero, which would hide the adapters' arithmetic
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, -100, -100, -100, 13, 14, 15, 2]])}
    seen = []
    a_module = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    a_module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    grads = {"autocast": torch.autograd.grad(trainer.answer_only_loss(model, batch), list(lora.values()))}
    monkeypatch.setattr(trainer, "adapter_autocast", lambda _model: contextlib.nullcontext())  # peft's float32 path
    grads["peft"] = torch.autograd.grad(trainer.answer_only_loss(model, batch), list(lora.values()))
    assert seen == [torch.bfloat16, torch.float32]
    assert all(p.dtype == torch.float32 for p in lora.values()) and all(g.dtype == torch.float32 for g in grads["autocast"])
    for a, b in zip(grads["autocast"], grads["peft"]):
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_head_gradient_filter_leaves_out_only_columns_below_it(softcap):
    """grad_filter: the loss stays exact; the input gradient is the exact one summed over the columns
    where some row of the chunk reaches the threshold (plus the targets), and a threshold below every
    probability changes nothing."""
    from finetune.loss import linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = (20 * torch.randn(23, 16)).requires_grad_(True)  # peaked: most columns negligible
    target = torch.randint(0, 300, (23,))
    loss_of = lambda z: torch.nn.functional.cross_entropy(torch.tanh(z / softcap) * softcap if softcap else z, target, reduction="sum")
    logits = head(hidden)
    exact = loss_of(logits)
    (g_exact,) = torch.autograd.grad(exact, hidden)
    # the per-column gradient of the loss wrt the logits, chunk by chunk as the loss forms it
    d_logits = torch.autograd.functional.jacobian(loss_of, logits.detach())
    threshold, expected, kept = 1e-3, torch.empty_like(g_exact), []
    for s in range(0, 23, 5):
        chunk = d_logits[s : s + 5]
        keep = chunk.amax(dim=0) >= threshold
        keep[target[s : s + 5]] = True
        expected[s : s + 5] = chunk[:, keep] @ head.weight[keep]
        kept.append(int(keep.sum()))
    assert max(kept) < 300 * 0.8  # the threshold leaves columns out of every chunk
    filtered = linear_cross_entropy(hidden, head, target, softcap, rows=5, grad_filter=threshold)
    (g_filtered,) = torch.autograd.grad(filtered, hidden)
    assert torch.allclose(filtered, exact, atol=1e-4)
    assert torch.allclose(g_filtered, expected, atol=1e-5) and not torch.allclose(g_filtered, g_exact, atol=1e-5)
    (g_all,) = torch.autograd.grad(linear_cross_entropy(hidden, head, target, softcap, rows=5, grad_filter=1e-30), hidden)
    assert torch.allclose(g_all, g_exact, atol=1e-5)


def test_answer_only_loss_gradients_match_full_logits_with_a_frozen_head(tiny_models):
    """Trained as under LoRA (output layer frozen): the same gradients as the full-logits loss."""
    from transformers import AutoModelForCausalLM

    from finetune.loss import answer_only_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"]).eval()
    model.get_output_embeddings().weight.requires_grad_(False)  # tied to the input embeddings
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 2], [0, 0, 1, 16, 17, 18, 19, 2]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, -100, -100, 13, 14, 15, 2], [-100, -100, -100, -100, -100, 18, 19, 2]])
    params = [p for p in model.parameters() if p.requires_grad]
    ours = answer_only_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    g_ours = torch.autograd.grad(ours, params)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    g_ref = torch.autograd.grad(reference, params)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_ref))
    # the recipe's head_grad_filter reaches the output layer: the same loss, a coarser gradient
    filtered = answer_only_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, grad_filter=0.5)
    g_filtered = torch.autograd.grad(filtered, params)
    assert torch.allclose(filtered, reference, atol=1e-5)
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_filtered, g_ref))


def test_tokenize_masks_prompt_for_causal_and_not_for_seq2seq(tiny_models):
    from transformers import AutoTokenizer

    from finetune.data import tokenize

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    row = tokenize([("Question: What is AI?\nAnswer:", " Machines.")], tok, 64, seq2seq=False)[0]
    n_prompt = len(tok("Question: What is AI?\nAnswer:")["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt and row["labels"][-1] == tok.eos_token_id
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    s2s = tokenize([("question: What is AI?", "Machines.")], AutoTokenizer.from_pretrained(tiny_models["bart"]), 64, seq2seq=True)[0]
    assert -100 not in s2s["labels"]


def test_raft_contexts_train_split_only_own_pair_left_out_and_drop_oracle(tmp_path, embedder, course_dir):
    from finetune.data import build_train_index, contexts_for
    from index.qa import QARecord, split_records

    recs = [QARecord(f"What is topic {w}?", f"Topic {w} is about {w} things.") for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon".split()]
    splits = split_records(recs)
    train, held = splits["train"], splits["validation"] + splits["test"]
    retriever = build_train_index(train, tmp_path / "ti", [course_dir], embedder=embedder, progress=False)
    indexed = {c.text for c in retriever.chunks}
    assert all(f"Answer: {r.answer}" not in "\n".join(indexed) for r in held)  # the leakage guard
    assert all(any(f"Answer: {r.answer}" in t for t in indexed) for r in train)
    own = contexts_for(train, retriever, 2, drop_oracle=0.0, seed=1, drop_own_pair=False)
    assert sum(any(r.answer in p for p in c) for r, c in zip(train, own)) >= len(train) - 1
    # by default an example never sees its own pair, as an evaluated question never does
    for kept in (contexts_for(train, retriever, 2, drop_oracle=0.0, seed=1), contexts_for(train, retriever, 2, drop_oracle=1.0, seed=1)):
        assert all(not any(r.answer in p for p in c) for r, c in zip(train, kept)) and all(len(c) == 2 for c in kept)
    # a gold course section stays in the context unless the oracle is dropped
    gold = [QARecord("How does dropout work during training?", "It zeroes activations.", gold=["unit2/dropout#how-dropout-works"])]
    holds = lambda c: any("sets each activation to zero" in p for p in c[0])
    assert holds(contexts_for(gold, retriever, 3, drop_oracle=0.0, seed=1))
    assert not holds(contexts_for(gold, retriever, 3, drop_oracle=1.0, seed=1))
    # training contexts come from the ranking the recipe names (dense by default; answers are served hybrid)
    by_mode = {}
    for mode in ("dense", "bm25", "hybrid"):
        ranked = [[p.text for p in h if not r.owns(retriever.chunks[p.chunk_id])][:2] for r, h in zip(train, retriever.search_many([r.question for r in train], 5, mode))]
        by_mode[mode] = contexts_for(train, retriever, 2, drop_oracle=0.0, seed=1, mode=mode)
        assert by_mode[mode] == ranked
    assert by_mode["dense"] != by_mode["bm25"]  # the three rankings differ here, so the mode is what chose
    assert load_recipe("gemma-270m-lora").rag_mode == "dense"


def test_ctrl_c_checkpoints_then_resume(tiny_models, tmp_path, aimlqa_home, monkeypatch):
    import os
    import signal

    from finetune import run as run_mod
    from finetune.run import finetune
    from finetune.interrupt import StopOnSignal
    from finetune.outputs import last_checkpoint
    from rag.registry import register

    register("tiny-gpt2", family="gpt2", base=str(tiny_models["gpt2"]), context_window=256)
    recipe = load_recipe("gpt2-lora", FAST + ["model=tiny-gpt2", "lora.target_modules=[c_attn]", "max_steps=4", "eval_every=2"])
    out, data = tmp_path / "out", [qa_rows(tmp_path)]
    original_step_end = StopOnSignal.on_step_end
    handler_before = signal.getsignal(signal.SIGINT)

    def ctrl_c_at_step_two(self, args, state, control, **kwargs):
        if state.global_step == 2 and not self.stop:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the installed handler
        return original_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", ctrl_c_at_step_two)
    stopped = finetune(recipe, data, out, name="r", progress=False)
    assert stopped["stopped"] and stopped["step"] == 2
    assert last_checkpoint(out).endswith("checkpoint-2") and not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's handler is restored

    # another run's settings or data must not pick up these checkpoints
    changed = recipe.model_copy(update={"lr": recipe.lr * 2})
    with pytest.raises(UserError, match=r"other settings \(recipe\.lr: 0\.0002 -> 0\.0004\).*another --out"):
        finetune(changed, data, out, name="r", progress=False)
    more = tmp_path / "more.jsonl"
    more.write_text(data[0].read_text().replace("course topic", "topic of the course"))
    with pytest.raises(UserError, match=r"data\.train: '\w+' -> '\w+'"):
        finetune(recipe, [more], out, name="r", progress=False)
    assert last_checkpoint(out).endswith("checkpoint-2")

    monkeypatch.setattr(StopOnSignal, "on_step_end", original_step_end)
    seen = {}
    original_train = run_mod.QATrainer.train

    def spy(self, resume_from_checkpoint=None, **kw):
        seen["resume"] = resume_from_checkpoint
        return original_train(self, resume_from_checkpoint=resume_from_checkpoint, **kw)

    monkeypatch.setattr(run_mod.QATrainer, "train", spy)
    resumed = finetune(recipe, data, out, name="r", progress=False)
    assert seen["resume"].endswith("checkpoint-2") and resumed["steps"] == 4 and (out / "adapter").is_dir()


def test_out_that_is_a_file_is_a_clear_error(tmp_path, aimlqa_home):
    from finetune.run import finetune

    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(UserError, match="taken is a file; pass a directory path"):
        finetune(load_recipe("gpt2-lora"), [qa_rows(tmp_path)], tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a directory"
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)  # a user's folder: its model/ must not be replaced by a full fine-tune
    with pytest.raises(UserError, match="holds other files, not a fine-tuning run's output; pass a new or empty directory"):
        finetune(load_recipe("gpt2-lora"), [qa_rows(tmp_path)], mine)
    assert sorted(p.name for p in mine.iterdir()) == ["model"]


def test_qlora_refused_without_cuda(monkeypatch, tmp_path, aimlqa_home):
    # No GPU here: what can run is the up-front refusal (the 4-bit path itself needs CUDA).
    from finetune.run import finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("mistral-7b-qlora", "llama-3.1-8b-qlora"):
        with pytest.raises(UserError, match="needs a CUDA GPU.*gemma-270m-lora"):
            finetune(load_recipe(name), [qa_rows(tmp_path)], tmp_path / name)
        assert not (tmp_path / name).exists()


def test_recipe_overrides_and_errors():
    r = load_recipe("gemma-270m-lora", ["lr=1e-4", "lora.r=4", "context=rag"])
    assert r.lr == 1e-4 and r.lora.r == 4 and r.context == "rag" and r.model == "gemma-270m"
    with pytest.raises(UserError, match="unknown recipe"):
        load_recipe("t5-lora")
    with pytest.raises(UserError, match="key=value"):
        load_recipe("gpt2-lora", ["lr"])
    with pytest.raises(UserError, match="context"):
        load_recipe("gpt2-lora", ["context=maybe"])
    # a misspelt field names the ones its place knows, nested too
    with pytest.raises(UserError, match=r"'gpt2-lora': epoch: unknown field; known: .*\bepochs\b"):
        load_recipe("gpt2-lora", ["epoch=3"])
    with pytest.raises(UserError, match=r"lora\.rank: unknown field; known: alpha, dropout, r, target_modules, top_layers$"):
        load_recipe("gpt2-lora", ["lora.rank=8"])


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_top_layers_adapts_only_the_top_and_backward_stops_below(family, tiny_models):
    """lora.top_layers=1 on a 2-layer model: adapters only in the top layer, and the backward pass
    never reaches the bottom one (what makes it cheaper)."""
    from finetune.model import load_for_training
    from finetune.loss import answer_only_loss
    from rag.registry import ModelSpec

    spec = ModelSpec(name=f"tiny-{family}", family=family, base=str(tiny_models[family]))
    targets = "[c_attn]" if family == "gpt2" else "[q_proj,v_proj]"
    recipe = load_recipe(RECIPE_OF[family], [f"lora.target_modules={targets}", "lora.top_layers=1"])
    model, _, _ = load_for_training(spec, recipe)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted and all((".1." in n) and (".0." not in n) for n in adapted), adapted
    layers = [m for n, m in model.named_modules() if n.endswith(("h", "layers")) and isinstance(m, torch.nn.ModuleList)][0]
    reached = []
    for i, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda *_, i=i: reached.append(i))
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 2]])
    labels = torch.tensor([[-100, -100, -100, -100, 13, 14, 15, 2]])
    answer_only_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}).backward()
    assert reached == [1]

    with pytest.raises(UserError, match="top_layers=3 but .* has 2 layers"):
        load_for_training(spec, load_recipe(RECIPE_OF[family], [f"lora.target_modules={targets}", "lora.top_layers=3"]))


def test_top_layers_refused_for_seq2seq(tiny_models):
    from finetune.model import load_for_training
    from rag.registry import ModelSpec

    spec = ModelSpec(name="tiny-bart", family="bart", base=str(tiny_models["bart"]))
    recipe = load_recipe("bart-large-xsum", ["method=lora", "lora.target_modules=[q_proj,v_proj]", "lora.top_layers=1"])
    with pytest.raises(UserError, match="decoder-only"):
        load_for_training(spec, recipe)


def test_cli_data_takes_several_files(tiny_models, tmp_path, aimlqa_home):
    """`--data a b` (the documented form) and `--data a --data b` both train on every file."""
    import json

    from typer.testing import CliRunner

    from aimlqa import cli
    from rag.registry import register

    register("tiny-gpt2", family="gpt2", base=str(tiny_models["gpt2"]), context_window=256, max_new_tokens=8)
    a = qa_rows(tmp_path)
    b = tmp_path / "more.jsonl"
    b.write_text("".join(json.dumps({"question": f"Why use pooling layer {i}?", "answer": f"Pooling shrinks feature map {i}."}) + "\n" for i in range(12)))
    cli._mount()
    args = ["finetune", "gpt2-lora", *[f"--set={s}" for s in FAST + ["model=tiny-gpt2", "lora.target_modules=[c_attn]"]]]
    ok = CliRunner().invoke(cli.app, args + ["--out", str(tmp_path / "o"), "--name", "two", "--data", str(a), str(b)])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["data"] == [str(a), str(b)]
    missing = CliRunner().invoke(cli.app, args + ["--out", str(tmp_path / "m"), "--data", str(a), "--data", str(tmp_path / "nope.jsonl")])
    assert isinstance(missing.exception, UserError) and "nope.jsonl: no such Q&A file" in str(missing.exception)


def test_full_recipe_trains_all_but_the_frozen_embeddings_under_bf16_autocast(tiny_models, tmp_path, aimlqa_home, monkeypatch):
    """gemma-270m-full: the embeddings (tied to the output layer) stay as they were, every other
    weight moves, and with mixed_precision=bf16 the backbone runs in bf16 on the CPU although the
    loss calls it outside model.forward, where accelerate's autocast sits."""
    from transformers import AutoModelForCausalLM

    import finetune.run as run
    from finetune.model import load_for_training
    from rag.registry import get_spec, register

    register("tiny-gemma3", family="gemma3", base=str(tiny_models["gemma3"]), context_window=256, max_new_tokens=8)
    seen = []

    def load_and_watch(spec, recipe):
        model, tok, how = load_for_training(spec, recipe)
        model.model.layers[0].mlp.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype) if torch.is_grad_enabled() else None)
        return model, tok, how

    monkeypatch.setattr(run, "load_for_training", load_and_watch)
    recipe = load_recipe("gemma-270m-full", FAST + ["model=tiny-gemma3"])
    assert recipe.method == "full" and recipe.freeze == ["embed_tokens"] and recipe.mixed_precision == "bf16"
    m = run.finetune(recipe, [qa_rows(tmp_path)], tmp_path / "out", name="tuned-full", progress=False)
    assert m["steps"] == 3 and seen and set(seen) == {torch.bfloat16}
    spec = get_spec("tuned-full")
    assert spec.adapter is None
    before = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(spec.base).state_dict()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    unmoved = [k for k in before if k not in ("model.embed_tokens.weight", "lm_head.weight") and torch.equal(before[k], after[k])]
    assert not unmoved


def test_freeze_errors_name_the_fix(tiny_models):
    from finetune.model import load_for_training
    from rag.registry import ModelSpec

    spec = ModelSpec(name="tiny-gemma3", family="gemma3", base=str(tiny_models["gemma3"]))
    with pytest.raises(UserError, match="freeze 'embeddings' names no parameter.*e.g. 'model.embed_tokens.weight'"):
        load_for_training(spec, load_recipe("gemma-270m-full", ["freeze=[embeddings]"]))
    with pytest.raises(UserError, match="`freeze` is for method=full"):
        load_recipe("gemma-270m-lora", ["freeze=[embed_tokens]"])  # refused with the recipe, before any model loads
    model, _, _ = load_for_training(spec, load_recipe("gemma-270m-full"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" not in trainable and len(trainable) == sum(1 for _ in model.parameters()) - 1
