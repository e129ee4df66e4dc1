"""The files an ablation leaves: predictions.jsonl, summary.csv/.json, report.md and the chart.

Everything is rendered from the summary dict alone, so a report can be re-rendered from
summary.json without rerunning anything (`render_report`, `plot`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from aimlqa.files import atomic_path, write_json, write_text
from eval.files import write_jsonl
from eval.metrics import ROUGE_TYPES
from eval.scoring import CITATION_KEYS
from rag.generators.base import is_greedy

CHART = "rouge_l.png"

# The seed's README (anukvma/group18_final_project, aiml_question_answers/README.md) and its
# training logs, on its own split of its data, with its own models: reported, not reproduced.
SEED_FIGURES = [
    ("BART-large-xsum", 0.384, 0.175, 0.313, 0.406, ""),
    ("GPT-2 (LoRA)", 0.482, 0.178, 0.394, 0.427, "¹"),
    ("Llama-3.1-8B (QLoRA)", 0.20, None, 0.22, None, "²"),
    ("Mistral-7B (QLoRA)", 0.26, None, 0.21, None, ""),
]
SEED_NOTES = [
    "¹ computed on teacher-forced arg-max tokens (each position predicted from the true prefix), not on generated answers: not comparable with generation-based scores.",
    "² 0.29 ROUGE-1 in its training log.",
]
RETRIEVAL_LABELS = {"recall": "recall@k", "mrr": "MRR", "ndcg": "nDCG@k", "hit": "hit@k", "hit_mrr": "hit MRR", "own": "own@k"}


def f3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def with_ci(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "–"
    return f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def mean(m: dict | None):
    return None if not m else m.get("mean")


def headline(summary: dict) -> tuple[int, str] | None:
    """The grounded setting shown in the headline table and chart: the configured one if it ran."""
    h = summary["run"]["config"]["headline"]
    rag = [c for c in summary["cells"] if c["rag"]]
    if any(c["k"] == h["k"] and c["mode"] == h["mode"] for c in rag):
        return h["k"], h["mode"]
    return (rag[0]["k"], rag[0]["mode"]) if rag else None


def headline_cells(summary: dict, dataset: str) -> list[tuple[dict | None, dict | None]]:
    """(plain, grounded-at-headline) per model, in the config's model order."""
    h = headline(summary)
    out = []
    for model in summary["models"]:
        cells = [c for c in summary["cells"] if c["dataset"] == dataset and c["model"] == model]
        plain = next((c for c in cells if not c["rag"]), None)
        grounded = next((c for c in cells if c["rag"] and h and (c["k"], c["mode"]) == h), None)
        if plain or grounded:
            out.append((plain, grounded))
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _model_label(summary: dict, name: str) -> str:
    info = summary["models"][name]
    tags = ["fine-tuned"] if info.get("fine_tuned") else []
    if info["backend"] == "retrieval":
        tags.append("floor")
    return f"{name} ({', '.join(tags)})" if tags else name


def _rouge_row(summary, cell) -> list[str]:
    return [_model_label(summary, cell["model"]), cell["setting"], f3(mean(cell["rouge1"])), f3(mean(cell["rouge2"])), with_ci(cell["rougeL"]), f3(mean(cell["rougeLsum"]))]


def _dataset_section(summary: dict, name: str) -> list[str]:
    ds = summary["datasets"][name]
    ix = summary["indexes"].get(name)
    lines = [f"## {name}: {ds['split']} split, {ds['n']} questions" + (f" (of {ds['split_size']})" if ds["n"] != ds["split_size"] else ""), ""]
    if ix and ix["leaky"]:
        lines += [f"> **LEAKY**: the index holds {ix['leaked']} of the evaluated Q&A pairs on purpose (`corpus.index_evaluated`); grounded scores here measure look-up, not generalisation.", ""]
    config = next(d for d in summary["run"]["config"]["datasets"] if d["name"] == name)
    if config.get("expect") == "abstain":
        return lines + ["Questions the course notes do not answer: the figure is how often the service says so instead of answering.", "",
                        *_citations_section(summary, name)]
    h = headline(summary)
    lines += [f"ROUGE F-measures (stemmed), means; ROUGE-L with its 95% bootstrap interval. Grounded = k={h[0]}, {h[1]} retrieval." if h else "ROUGE F-measures (stemmed), means.", ""]
    rows = [_rouge_row(summary, c) for pair in headline_cells(summary, name) for c in pair if c]
    if config.get("compare_seed"):
        rows += [[f"{m} (seed)", "fine-tuned, plain; *reported, not reproduced*" + mark, f3(r1), f3(r2), f3(rl), f3(rls)] for m, r1, r2, rl, rls, mark in SEED_FIGURES]
    lines += _table(["LLM", "Setting", "ROUGE-1", "ROUGE-2", "ROUGE-L [95% CI]", "ROUGE-Lsum"], rows)
    if config.get("compare_seed"):
        lines += ["", "Seed rows: the seed's published figures on its own test split of this data, with its own models; not rerun here. " + " ".join(SEED_NOTES)]
    lines += ["", *_paired_section(summary, name), *_citations_section(summary, name), *_cells_section(summary, name), *_retrieval_section(summary, name)]
    return lines


def _citations_section(summary: dict, name: str) -> list[str]:
    cells = [c for c in summary["cells"] if c["dataset"] == name and c.get("abstained")]
    if not cells:
        return []
    t = next((c["thresholds"] for c in cells if c.get("thresholds")), {}) or {}
    applied = (f"relevance < {t['relevance']}, support < {t['support']}" if t.get("calibrated")
               else "none (rag/abstention.json is missing or was measured with another embedding model)")
    lines = ["### Citations and abstention", "",
             f"As served: each answer sentence cites the passages scoring at least {t.get('cite')} (within {t.get('margin')} of its best); "
             f"the service abstains when {applied}. Citation precision and recall are against the gold sections, over the answers given; "
             "served ROUGE-L counts an abstention as 0.", ""]
    rows = [[_model_label(summary, c["model"]), c["setting"], with_ci(c["abstained"]), with_ci(c["citation_precision"]), with_ci(c["citation_recall"]),
             f3(mean(c.get("citation_precision_topic"))),
             with_ci(c["unsupported"]), f3(mean(c["support"])), with_ci(c["rougeL"]), with_ci(c["rougeL_served"])] for c in cells]
    return lines + _table(["Model", "Setting", "abstained", "citation precision", "citation recall", "precision by note", "unsupported sentences", "support", "R-L answered", "R-L served"], rows) + [""]


def _paired_section(summary: dict, name: str) -> list[str]:
    labels = {"rag": "What retrieval adds (grounded − plain, same model)", "finetune": "What fine-tuning adds (fine-tuned − base, same setting)",
              "floor": "Generation vs the retrieval-only floor (model − floor, same retrieval)"}
    lines = []
    for kind, title in labels.items():
        rows = [p for p in summary["paired"] if p["kind"] == kind and p["dataset"] == name and p["metric"] == "rougeL"]
        if not rows:
            continue
        lines += [f"### {title}", ""]
        lines += _table(["A", "B", "Δ ROUGE-L", "95% CI", "p", "n"], [
            [p["a"].split("/", 1)[1], p["b"].split("/", 1)[1], f"{p['delta']:+.3f}" if p["delta"] is not None else "–",
             f"[{p['lo']:+.3f}, {p['hi']:+.3f}]" if p["lo"] is not None else "–", f3(p["p"]), str(p["n"])]
            for p in rows
        ])
        lines.append("")
    return lines


def _cells_section(summary: dict, name: str) -> list[str]:
    cells = [c for c in summary["cells"] if c["dataset"] == name]
    keys = [k for k in RETRIEVAL_LABELS if any(k in c["retrieval"] for c in cells)]
    rows = []
    for c in cells:
        retrieval = [f3(mean(c["retrieval"].get(k))) for k in keys]
        rows.append([_model_label(summary, c["model"]), c["setting"], f3(mean(c["rouge1"])), f3(mean(c["rouge2"])), with_ci(c["rougeL"]), f3(mean(c["rougeLsum"])),
                     f3(mean(c["grounding"])), f"{mean(c['words']):.1f}", f"{c['empty']}/{c['degenerate']}", *retrieval, f"{c['seconds']:.0f}"])
    header = ["Model", "Setting", "R-1", "R-2", "R-L [95% CI]", "R-Lsum", "grounding", "words", "empty/degen.", *(RETRIEVAL_LABELS[k] for k in keys), "s"]
    return ["### Every cell", "", *_table(header, rows), ""]


def _retrieval_section(summary: dict, name: str) -> list[str]:
    rows = [r for r in summary["retrieval"] if r["dataset"] == name]
    if not rows:
        return []
    keys = [k for k in RETRIEVAL_LABELS if any(k in r for r in rows)]
    return ["### Retrieval (the same for every model)", "",
            *_table(["Mode", "k", *(RETRIEVAL_LABELS[k] for k in keys)], [[r["mode"], str(r["k"]), *(with_ci(r.get(k)) for k in keys)] for r in rows]), ""]


def _decoding(config: dict) -> str:
    beams, t = config.get("num_beams", 1), config.get("temperature", 0.0)
    what = f"beam search, {beams} beams" if beams > 1 else ("greedy" if is_greedy(t) else f"sampled at temperature {t:g}")
    return f"decoding: {what}, up to {config.get('max_new_tokens')} new tokens"


def _provenance(summary: dict) -> list[str]:
    run = summary["run"]
    lines = ["## Provenance", "", f"Run `{run['id']}` ({run['name']}), {run.get('started', '')} to {run.get('finished', '')}, "
             f"{run.get('wall_s', 0):.0f} s on {run['cpus']} CPUs; seed {run['seed']}, {run['bootstrap']} bootstrap resamples, limit {run['limit'] or 'none'}; "
             f"{_decoding(run['config'])}.", ""]
    rows = []
    for name, m in summary["models"].items():
        ft = m.get("finetune") or {}
        adapter = f"{m['adapter']} (sha256 {m.get('adapter_sha256', '?')})" if m.get("adapter") else "–"
        data = ", ".join(Path(d).name for d in ft.get("data") or []) or "?"
        trained = f"{ft.get('name')}: {ft.get('method')}, {ft.get('steps')} steps on {data} (train split {(ft.get('split_hashes') or {}).get('train')})" if ft else "–"
        rows.append([name, m["family"], m["backend"], m["base"] or "–", adapter, trained])
    lines += _table(["Model", "Family", "Backend", "Base", "Adapter", "Fine-tuning"], rows) + [""]
    lines += _table(["Dataset", "File", "Split", "File hash", "Split hash", "Index", "Index qa_split", "Chunks"], [
        [n, d["path"], d["split"], d["file_hash"], d["split_hash"], (summary["indexes"].get(n) or {}).get("manifest_hash", "–"),
         str((summary["indexes"].get(n) or {}).get("qa_split")), str((summary["indexes"].get(n) or {}).get("n_chunks", "–"))]
        for n, d in summary["datasets"].items()
    ]) + [""]
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in run["versions"].items()), ""]
    return lines


DEFINITIONS = [
    "ROUGE: the project's `evaluate` module (`eval/rouge_metric`), equal to `rouge_score` with Porter stemming; per-question F-measures averaged (not the aggregator's random bootstrap median).",
    "Intervals: 95% percentile bootstrap of the mean over questions. Paired tests: bootstrap of the per-question difference on the same questions; p is two-sided and not adjusted for the number of comparisons.",
    "Retrieval with gold sections (the project's Q&A set): recall@k (share of gold sections retrieved), MRR, nDCG@k (binary relevance, a section counted once).",
    "Retrieval without gold (group18-style data): a passage hits when it holds at least {thr:.0%} of the reference answer's distinct content words; hit@k and hit MRR. own@k (only when the evaluated pairs are indexed on purpose): the question's own pair retrieved.",
    "Grounding: share of the answer's distinct content words found in the passages it was shown (grounded cells only). Degenerate: empty, under 3 words, repetitive (under 40% distinct words in 10+) or an echo of the question.",
    "Plain cells depend on neither k nor retrieval mode and run once per model. The index holds the course notes and the evaluated file's {split} split, never the evaluated pairs (checked on the built index).",
]


def render_report(summary: dict) -> str:
    run = summary["run"]
    lines = [f"# Ablation: {run['name']}", "",
             "How much do retrieval and fine-tuning each add? Plain vs retrieval-augmented ROUGE across models, top-k and retrieval mode, "
             "measured on held-out questions. Files beside this one: `predictions.jsonl` (every question of every cell), "
             f"`summary.csv`, `summary.json`, `{CHART}`.", ""]
    if any(ix["leaky"] for ix in summary["indexes"].values()):
        lines += ["> **LEAKY RUN**: some evaluated answers were indexed on purpose; see the flagged datasets.", ""]
    trained = [(name, ds, n) for name, m in summary["models"].items() for ds, n in (m.get("trained_on_evaluated") or {}).items() if n]
    if trained:
        lines += [f"> **LEAKY**: `{name}` was fine-tuned on {n} of the evaluated questions of `{ds}`; its scores there are not a test of generalisation." for name, ds, n in trained] + [""]
    for name in summary["datasets"]:
        lines += _dataset_section(summary, name)
    lines += [f"![ROUGE-L per model, plain vs grounded]({CHART})", "", "## Notes", ""]
    cfg = run["config"]
    lines += [f"- {n}" for n in summary["notes"]]
    lines += [f"- {d.format(thr=cfg['hit_threshold'], split=cfg['corpus']['dataset_split'])}" for d in DEFINITIONS]
    lines.append("")
    lines += _provenance(summary)
    return "\n".join(lines)


CSV_FIELDS = ["run", "id", "dataset", "split", "model", "fine_tuned", "floor", "rag", "k", "mode", "n"]


def summary_csv(summary: dict) -> str:
    """One row per cell; every mean with its interval; the run id links to summary.json's provenance."""
    rows = []
    for c in summary["cells"]:
        row = {k: c.get(k) for k in CSV_FIELDS if k != "run"} | {"run": summary["run"]["id"]}
        for m in (*ROUGE_TYPES, "grounding", "words", *CITATION_KEYS):
            if c.get(m):
                row |= {m: c[m]["mean"], f"{m}_lo": c[m]["lo"], f"{m}_hi": c[m]["hi"]}
        for m, v in c["retrieval"].items():
            row |= {m: v["mean"], f"{m}_lo": v["lo"], f"{m}_hi": v["hi"]}
        for vs in ("vs_plain", "vs_base"):
            if c.get(vs):
                row |= {f"{vs}_rougeL_delta": c[vs]["delta"], f"{vs}_rougeL_lo": c[vs]["lo"], f"{vs}_rougeL_hi": c[vs]["hi"], f"{vs}_rougeL_p": c[vs]["p"]}
        row |= {k: c[k] for k in ("completion_tokens", "empty", "degenerate", "seconds", "fingerprint", "index_hash")}
        row |= {"seed": summary["run"]["seed"], "dataset_hash": summary["datasets"][c["dataset"]]["file_hash"], "split_hash": summary["datasets"][c["dataset"]]["split_hash"]}
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot(summary: dict, path: Path) -> None:
    """ROUGE-L per model, plain vs grounded (headline setting), with 95% intervals; one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["datasets"])
    h = headline(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(max(6, 4.5 * len(names)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        pairs = headline_cells(summary, name)
        for j, (label, pick, color) in enumerate((("plain", 0, "#9aa5b1"), (f"grounded (k={h[0]}, {h[1]})" if h else "grounded", 1, "#2f6fb0"))):
            xs, ys, err = [], [], [[], []]
            for i, pair in enumerate(pairs):
                c = pair[pick]
                if c and c["rougeL"]["mean"] is not None:
                    m = c["rougeL"]
                    xs.append(i + (j - 0.5) * 0.38)
                    ys.append(m["mean"])
                    err[0].append(m["mean"] - m["lo"])
                    err[1].append(m["hi"] - m["mean"])
            ax.bar(xs, ys, 0.36, yerr=err, capsize=3, label=label, color=color)
        ax.set_xticks(range(len(pairs)), [(p[0] or p[1])["model"] for p in pairs], rotation=20, ha="right", fontsize=8)
        ds = summary["datasets"][name]
        ax.set_title(f"{name} ({ds['split']}, n={ds['n']})", fontsize=10)
        ax.set_ylabel("ROUGE-L (95% CI)")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    meta = {"Title": f"ROUGE-L, ablation {summary['run']['name']}", "Description": json.dumps({"run": summary["run"]["id"], "datasets": summary["datasets"]})}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata=meta)
    plt.close(fig)


def portable(obj):
    """Paths as a reader elsewhere can follow them: inside the repository relative to it, beside it
    as `../`, under AIMLQA_HOME as `$AIMLQA_HOME/`; a result file must not carry this machine's layout."""
    from aimlqa import settings

    text = json.dumps(obj)
    for prefix, short, alone in ((settings.home(), "$AIMLQA_HOME/", "$AIMLQA_HOME"), (settings.REPO_ROOT, "", "."), (settings.REPO_ROOT.parent, "../", "..")):
        escaped = json.dumps(str(prefix))[1:-1]
        text = text.replace(f'"{escaped}"', f'"{alone}"').replace(f"{escaped}/", short)
    return json.loads(text)


def write_outputs(summary: dict, predictions: list[dict], out: Path) -> dict[str, Path]:
    out = Path(out)
    summary = portable(summary)
    paths = {name: out / name for name in ("predictions.jsonl", "summary.json", "summary.csv", "report.md", CHART)}
    write_jsonl(paths["predictions.jsonl"], predictions)
    write_json(paths["summary.json"], summary)
    write_text(paths["summary.csv"], summary_csv(summary))
    plot(summary, paths[CHART])
    write_text(paths["report.md"], render_report(summary))
    return paths
