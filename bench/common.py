"""What every benchmark records: the machine, package versions, and a JSON writer."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).with_name("results")


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def write(name: str, data: dict) -> Path:
    """bench/results/NAME.json, with paths made portable (relative to the repository, or $AIMLQA_HOME)."""
    from eval.report import portable
    from index.store import versions

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = portable({"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "versions": versions(), **data})
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path


def verdict(what: str, value: float, target: float, higher_is_better: bool = True) -> str:
    """One line against a bench's stored target: PASS or FALL SHORT, never silent."""
    ok = value >= target if higher_is_better else value <= target
    return f"{what}: {value:g} against a target of {'>=' if higher_is_better else '<='} {target:g}: {'PASS' if ok else 'FALL SHORT'}"


def percentiles(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]
    return {"p50_ms": round(q(0.5), 3), "p95_ms": round(q(0.95), 3), "p99_ms": round(q(0.99), 3), "mean_ms": round(statistics.mean(s), 3), "n": len(s)}


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
