"""The README's benchmark table is generated from bench/results/*.json: it must match them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# loaded by path: putting bench/ on sys.path would let bench/finetune.py shadow the finetune package
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def test_the_readme_table_is_the_one_the_json_gives():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.render(readme) == readme, "README.md's benchmark table drifted: run `python bench/report.py`"
    for name, file, *_ in report.ROWS:  # every row the table promises has its measurements committed
        assert (report.RESULTS / file).is_file(), file
        assert f"`bench/results/{file}`" in readme


def test_a_changed_measurement_changes_the_table(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results, ignore=shutil.ignore_patterns("*.jsonl", "*.png"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    data = json.loads((results / "adapters.json").read_text())
    data["throughput"]["mixed_over_one_adapter"], data["throughput"]["pass"] = 0.5, False
    (results / "adapters.json").write_text(json.dumps(data))
    changed = report.render(readme, results)
    assert changed != readme and "0.50x of one adapter" in changed and "(target 0.8x: FALL SHORT)" in changed
