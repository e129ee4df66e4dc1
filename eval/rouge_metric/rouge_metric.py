"""ROUGE as an `evaluate` module, shipped with the project because `evaluate.load("rouge")` needs the hub.

It computes what the hub's `rouge` module computes (Google's `rouge_score` package, case-insensitive,
`rougeLsum` splitting sentences on newlines) with the same arguments. Callers in this project pass
`use_stemmer=True` and `use_aggregator=False` and average the per-example F-measures themselves: the
aggregator's "mid" is the median of a random bootstrap and differs from run to run.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

_DESCRIPTION = "ROUGE-N and ROUGE-L F-measures between predictions and references (rouge_score)."
_CITATION = "Lin, Chin-Yew. ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop, 2004."
_KWARGS = """
predictions: list of strings.
references: list of strings, or a list of lists of strings (several references: the best one counts).
rouge_types: default ["rouge1", "rouge2", "rougeL", "rougeLsum"].
use_aggregator: True (default) returns one bootstrap "mid" F-measure per type; False a list per type.
use_stemmer: Porter-stem words before matching (default False, as on the hub).
tokenizer: an optional callable str -> list[str] replacing rouge_score's tokenizer.
"""


class _Tokenizer:
    """rouge_score wants an object with `.tokenize`; callers pass a plain callable."""

    def __init__(self, fn):
        self.fn = fn

    def tokenize(self, text):
        return self.fn(text)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RougeMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string", id="sequence"), "references": datasets.Sequence(datasets.Value("string", id="sequence"))}
                ),
                datasets.Features({"predictions": datasets.Value("string", id="sequence"), "references": datasets.Value("string", id="sequence")}),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False, tokenizer=None):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=_Tokenizer(tokenizer) if tokenizer else None)
        multi = bool(references) and isinstance(references[0], list)
        per = [scorer.score_multi(r, p) if multi else scorer.score(r, p) for r, p in zip(references, predictions)]
        if use_aggregator:
            agg = scoring.BootstrapAggregator()
            for s in per:
                agg.add_scores(s)
            return {t: s.mid.fmeasure for t, s in agg.aggregate().items()}
        return {t: [s[t].fmeasure for s in per] for t in rouge_types}
