"""Tiny random models of every family, built offline: a small config and a BPE tokenizer trained
with `tokenizers` on course text. They run the real code paths in seconds."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import NOTES, QA

FAMILIES = ("gpt2", "bart", "mistral", "llama", "gemma3")


def train_tokenizer(out: Path, seq2seq: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = list(NOTES.values()) + [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in QA]
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if seq2seq:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def tiny_config(family: str, vocab: int):
    from transformers import BartConfig, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, **common)
    if family == "bart":
        return BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512, decoder_start_token_id=2,
                          forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0, **common)
    dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=512, **common)
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=64, **dec)
    return (MistralConfig if family == "mistral" else LlamaConfig)(**dec)


def build_tiny(family: str, out: Path, **config) -> Path:
    """A saved random model dir for the family, loadable by `from_pretrained`; `config` overrides
    the tiny config (e.g. a head size that GPU attention kernels take)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    seq2seq = family == "bart"
    tok = train_tokenizer(out, seq2seq)
    torch.manual_seed(0)
    cfg = tiny_config(family, len(tok))
    cfg.update(config)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(cfg)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    return out


def tiny_spec(family: str, path: Path, **fields):
    """float32 unless asked: the tests compare logits at float32 tolerances, whatever the CPU."""
    from rag.registry import ModelSpec

    fields = {"dtype": "float32", "name": f"tiny-{family}"} | fields
    return ModelSpec(family=family, base=str(path), context_window=256, max_new_tokens=12, **fields)


# a fine-tuning run in seconds: a few steps, tiny batches and lengths
FAST = ["epochs=1", "max_steps=3", "batch_size=2", "grad_accum=1", "eval_every=2", "eval_samples=2", "max_new_tokens=4", "max_length=96"]


def qa_rows(tmp_path, n=24):
    """A small Q&A file for fine-tuning runs."""
    import json

    path = tmp_path / "qa.jsonl"
    topics = ["dropout", "gradient descent", "convolution", "pooling", "attention", "overfitting"]
    path.write_text("".join(json.dumps({"question": f"What is {t} number {i}?", "answer": f"{t.capitalize()} is a course topic {i}."}) + "\n" for i in range(n) for t in topics[:1]))
    return path
