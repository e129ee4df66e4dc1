"""The evaluator: ROUGE through `evaluate`, retrieval and grounding metrics, bootstrap intervals,
and the ablation runner that measures what retrieval and fine-tuning each add."""
