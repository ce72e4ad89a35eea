# One virtualenv at .venv holds the server, the tests and the parity oracle.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On a fresh CPU machine this pin picks up the local CPU wheel; on a CUDA machine set
# TORCH_SPEC to the build you want (or leave your existing torch in place).
TORCH_SPEC ?= torch==2.13.0
MODEL  ?= Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: setup serve test test-all lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	# The oracle and the tokenizer ranks for random-weight models, without their heavy pins:
	# qwen-tts pins gradio/torchaudio (unusable with a CPU torch), dashscope only ships the file.
	$(BIN)/pip install -q --no-deps qwen-tts==0.1.1 dashscope==2.0.2
	touch $@

serve: setup
	$(BIN)/python -m realtime serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m engine bench --model random:0.6b

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
