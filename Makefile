# Two commands on a fresh machine: `make run` and `make test`. Each creates .venv when missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
AIMLQA  := $(VENV)/bin/aimlqa
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
# the index `aimlqa ask` and `aimlqa serve` find by default (aimlqa.settings.default_index_dir)
INDEX   ?= $(or $(AIMLQA_INDEX),$(or $(AIMLQA_HOME),$(HOME)/.cache/aimlqa)/indexes/course)

.PHONY: install index run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch on disk, before anything that would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,scale]'
	# llama.cpp's binding, built from source (about 5 min on 2 cores, once: pip caches the wheel); the
	# rest works without it, so a failed build is a note, not a stop
	$(PY) -m pip install -q -e '.[llamacpp]' || echo "note: llama-cpp-python did not build; the llama.cpp models (-m gemma-270m-aiml-cpp) are unavailable"
	touch $(STAMP)

install: $(STAMP)

index: install
	$(AIMLQA) index build data/course data/qa/aiml_qa.jsonl --qa-split train --out $(INDEX)

run: index
	$(AIMLQA) serve --index $(INDEX) --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/agreement.py
	$(PY) bench/retrieval.py
	$(PY) bench/generation.py
	$(PY) bench/finetune.py
	$(PY) bench/serve_load.py
	$(PY) bench/ablation.py --limit 100
	$(PY) bench/decoding.py --limit 100
	$(PY) bench/ablation.py --config bench/default.yaml --limit 100
	$(PY) bench/adapters.py
	$(PY) bench/streaming.py
	$(PY) bench/citations.py
	$(PY) bench/llamacpp.py
	$(PY) bench/scale.py
	$(PY) bench/index_scale.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
