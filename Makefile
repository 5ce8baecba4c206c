# hpc_asr — `make demo` and `make test` set everything up themselves (idempotent).
SHELL := /bin/bash
PY      := .venv/bin/python
NP      ?= 2
HOURS   ?= 5.0
DATA    ?= data/va
RUN     ?= runs/demo
CONFIG  ?= hpc_asr/configs/demo.yaml
BAR_WER ?= 0.15
# mpirun refuses root without these; --oversubscribe lets NP exceed the detected slots.
MPIRUN  := $(if $(filter 0,$(shell id -u)),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1) \
           mpirun --oversubscribe --bind-to none -np $(NP)

.PHONY: setup setup-gpu demo test bench lint clean-demo

setup:
	@bash env/setup-local.sh

setup-gpu:
	@bash env/setup-local.sh --gpu

demo: setup
	$(PY) -m data_prep.synth --out $(DATA) --hours $(HOURS)
	for split in train dev test; do \
	  $(MPIRUN) $(PY) -m data_prep.fbank --config $(CONFIG) --manifest $(DATA)/$$split.jsonl \
	    --out $(DATA)/fbank/$$split || exit 1; done
	$(MPIRUN) $(PY) -m hpc_asr.train --config $(CONFIG) --train.out_dir $(RUN) \
	  --data.train $(DATA)/fbank/train --data.dev $(DATA)/fbank/dev
	$(PY) -m hpc_asr.evaluate --checkpoint $(RUN)/last.pt --data $(DATA)/fbank/test --out $(RUN)/eval.json
	$(PY) -m hpc_asr.export --checkpoint $(RUN)/last.pt --data $(DATA)/fbank/test --out-dir $(RUN)/export
	$(PY) -m hpc_asr.latency --model-dir $(RUN)/export --manifest $(DATA)/test.jsonl --out $(RUN)/latency.json
	$(PY) -m hpc_asr.report --run $(RUN) --bar-wer $(BAR_WER)

# TEST_ARGS=--runslow adds the end-to-end tests (CI runs them).
test: setup
	$(PY) -m pytest -q tests $(TEST_ARGS)

lint: setup
	$(PY) -m ruff check hpc_asr data_prep tests

clean-demo:
	rm -rf $(RUN) $(DATA)

# Benchmarks with same-run peer comparisons; JSON under runs/bench/.
bench: setup
	$(PY) -m hpc_asr.bench --out runs/bench/bench.json
