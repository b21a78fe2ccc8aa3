# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with
# pip when it is missing or older than pyproject.toml (quick no-op otherwise).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip prints a warning per package for the machine's optional local indexes; hide only those
QUIET_PIP := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: install demo test lint format clean arith audio-inputs video-inputs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP)
	# DeepSpeed builds against the installed torch; its CUDA ops are JIT-built when used.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

DIGITS := data/digits16/shard-000000.tar.index.json
TOKENIZER := data/tokenizer/captions.model
DEMO_RUN := runs/tiny/sd3_like
DEMO_STEPS ?= 1000
DIGIT_PROMPTS := $(foreach d,zero one two three four five six seven eight nine,"a photo of the digit $(d)")

$(DIGITS): | $(STAMP)
	$(PY) -m data_pipeline.build builtin:digits --out data/digits16 --size 16 --shard-size 300

$(TOKENIZER): $(DIGITS)
	$(PY) -m data_pipeline.tokenizer train --input data/digits16 --out data/tokenizer/captions --vocab-size 40 --model-type bpe

# Language-model inputs (recipes/tiny/{mdlm,sedd,bd3lm,ar_baseline}.yaml): the built-in
# arithmetic corpus as text shards, a character-level sentencepiece tokenizer trained on
# them, and token shards packed into windows at load time.
ARITH_TEXT := data/arith_text/shard-000000.tar.index.json
ARITH_TOKENIZER := data/tokenizer/arith.model
ARITH := data/arith/shard-000000.tar.index.json

$(ARITH_TEXT): | $(STAMP)
	$(PY) -m data_pipeline.build builtin:arith --num 50000 --seed 0 --out data/arith_text

$(ARITH_TOKENIZER): $(ARITH_TEXT)
	$(PY) -m data_pipeline.tokenizer train --input data/arith_text --out data/tokenizer/arith --vocab-size 18 --model-type char

$(ARITH): $(ARITH_TOKENIZER)
	$(PY) -m data_pipeline.build data/arith_text --tokenizer $(ARITH_TOKENIZER) --out data/arith

arith: $(ARITH)

# Audio DiT inputs (recipes/tiny/audio_dit.yaml): the built-in tones at 4 kHz and a
# tokenizer trained on their captions for the tiny T5.
TONES := data/tones4k/shard-000000.tar.index.json
TONES_TOKENIZER := data/tokenizer/tones.model

$(TONES): | $(STAMP)
	$(PY) -m data_pipeline.build builtin:tones --out data/tones4k --sample-rate 4000 --shard-size 128

$(TONES_TOKENIZER): $(TONES)
	$(PY) -m data_pipeline.tokenizer train --input data/tones4k --out data/tokenizer/tones --vocab-size 32 --model-type bpe

audio-inputs: $(TONES_TOKENIZER)

# Video DiT inputs (recipes/tiny/video_dit.yaml): 8-frame moving digits at 16 px and a
# tokenizer trained on their captions.
MOVING := data/moving8/shard-000000.tar.index.json
MOVING_TOKENIZER := data/tokenizer/moving.model

$(MOVING): | $(STAMP)
	$(PY) -m data_pipeline.build builtin:moving_digits --out data/moving8 --size 16 --frames 8 --shard-size 128

$(MOVING_TOKENIZER): $(MOVING)
	$(PY) -m data_pipeline.tokenizer train --input data/moving8 --out data/tokenizer/moving --vocab-size 40 --model-type bpe

video-inputs: $(MOVING_TOKENIZER)

# The main job, shrunk to 2 CPU cores: the SD3-like recipe's tiny twin on digit shards.
demo: $(STAMP) $(TOKENIZER)
	OMP_NUM_THREADS=1 $(PY) -m trainer.launch recipes/tiny/sd3_like.yaml run.max_steps=$(DEMO_STEPS) --fresh
	$(PY) -m trainer.sample --run $(DEMO_RUN) --prompts $(DIGIT_PROMPTS) --num-per-prompt 8 --steps 20 --cfg 3 --out $(DEMO_RUN)/demo_samples
	$(PY) -m trainer.plot $(DEMO_RUN)
	@echo "how an independent digit classifier reads the samples (trainer.digit_judge):"
	$(PY) -m trainer.digit_judge $(DEMO_RUN)/demo_samples
	@echo "samples: $(DEMO_RUN)/demo_samples/grid.png (a row per digit)   loss: $(DEMO_RUN)/loss.png   metrics: $(DEMO_RUN)/metrics.jsonl"

# pytest-xdist workers; each module stays on one worker (its fixtures are built once).
# Many tests start 2-rank runs of their own, so more workers than cores only adds contention.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf runs data .pytest_cache
