# t5lite — every entry point creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install bench clean-demo finetune-demo

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	touch $(STAMP)

install: $(STAMP)

## make test: install everything, then run the whole test suite.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

## make demo: train the bundled demo model (gin/demo.gin) into $(DEMO_DIR), evaluate it and show samples.
demo: $(STAMP)
	$(VENV)/bin/t5lite train --gin_file=gin/demo.gin --model_dir=$(DEMO_DIR)
	$(VENV)/bin/t5lite eval --gin_file=gin/demo.gin --model_dir=$(DEMO_DIR)
	$(VENV)/bin/t5lite infer --model_dir=$(DEMO_DIR) --task_examples=5

## make finetune-demo: fine-tune the demo model ($(DEMO_DIR), trained or finished first) on the
## title task (paragraph -> page title, tasks/t5lite_tasks/demo/title_task.py), train the same
## architecture from scratch with the same settings, and print both validation metrics.
FINETUNE_DIR ?= runs/finetune_demo
FINETUNE_ARGS = --gin_file=gin/models/demo.gin --gin_file=gin/runs/finetune.gin \
	--gin_file=gin/finetune_demo.gin --gin.TRAIN_FILES=$(FINETUNE_DIR)/data/train.tsv.gz \
	--gin.VALIDATION_FILES=$(FINETUNE_DIR)/data/validation.tsv.gz
finetune-demo: $(STAMP)
	$(VENV)/bin/t5lite train --gin_file=gin/demo.gin --model_dir=$(DEMO_DIR)  # no-op when done
	$(PY) tasks/t5lite_tasks/demo/title_task.py make --output_dir=$(FINETUNE_DIR)/data
	$(VENV)/bin/t5lite train $(FINETUNE_ARGS) --gin.INIT_FROM=$(DEMO_DIR) --model_dir=$(FINETUNE_DIR)/pretrained
	$(VENV)/bin/t5lite train $(FINETUNE_ARGS) --gin.INIT_FROM=None \
		--gin.VOCABULARY=tasks/t5lite_tasks/demo/data/demo_8k.model --model_dir=$(FINETUNE_DIR)/scratch
	$(PY) tasks/t5lite_tasks/demo/title_task.py compare $(FINETUNE_DIR)/pretrained $(FINETUNE_DIR)/scratch

## make bench: the CPU benchmarks of the README "Performance" table (~40 minutes on 2 cores):
## t5lite train step (T5 v1.1-small, batch 8, 512/114, float32 and bfloat16, MFU vs the measured
## matmul peak), t5lite vs transformers (AdamW steps and greedy decoding, same run), t5lite vs a
## plain JAX T5 (same run), input pipeline throughput, the attention cores (blocked vs whole-tensor
## einsum vs xla, and the whole model with and without blocks), decoding with cross K/V vs absorbed
## cross-attention, where a greedy step's time goes. JSON results go to benchmarks/results/.
bench: $(STAMP)
	$(PY) benchmarks/train_step.py --gin_file=gin/models/t5_1_1/small.gin --batch_size=8 --inputs_length=512 --targets_length=114 --steps=5 --dtype=float32
	$(PY) benchmarks/train_step.py --gin_file=gin/models/t5_1_1/small.gin --batch_size=8 --inputs_length=512 --targets_length=114 --steps=5 --dtype=bfloat16
	$(PY) benchmarks/vs_transformers.py
	$(PY) benchmarks/vs_transformers.py --skip_decode --dtype=bfloat16 --transformers_dtype=bfloat16
	$(PY) benchmarks/vs_transformers.py --skip_decode --transformers_process=separate --out=benchmarks/results/vs_transformers_float32_separate.json
	$(PY) benchmarks/allocator_ab.py --rounds=2
	$(PY) benchmarks/plain_jax_t5.py --rounds=3
	$(PY) benchmarks/data_throughput.py --cases=demo_span_corruption:512:114
	$(PY) benchmarks/attention_impl.py --model_rounds=3 --out=benchmarks/results/attention_impl.json
	$(PY) benchmarks/cross_attention_ab.py --dtype=float32
	$(PY) benchmarks/cross_attention_ab.py --dtype=bfloat16
	$(PY) benchmarks/decode_profile.py --dtype=float32
	$(PY) benchmarks/decode_profile.py --dtype=bfloat16
	$(PY) benchmarks/compile_cache.py --model=t5_1_1_small

clean-demo:
	rm -rf $(DEMO_DIR)
