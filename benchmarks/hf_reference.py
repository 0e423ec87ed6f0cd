"""The `transformers` (PyTorch, CPU) side of the side-by-side benchmarks.

Builds `T5ForConditionalGeneration` with the same shape as a t5lite `ModelConfig` (T5 v1.1
layout: gated-GELU, untied, relative bias), and times an AdamW train step and greedy `generate`
exactly as a user of transformers would run them.
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

if __name__ == "__main__":  # run as the train worker: t5lite (for ModelConfig) from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite.config import ModelConfig  # noqa: E402
from t5lite.host_malloc import allocator_variables  # noqa: E402

WORKER_PREFIX = "@@hf-train-worker "


def hf_config(cfg: ModelConfig):
    """transformers.T5Config with the shape of `cfg` (dense, relative-bias models only)."""
    from transformers import T5Config

    if cfg.position_scheme != "relative" or cfg.num_experts or cfg.kv_heads != cfg.num_heads:
        raise ValueError("transformers' T5 has relative bias, MHA and dense FFNs only; "
                         "benchmark a T5 v1.1-shaped config")
    act = {"gelu": "gelu_new", "relu": "relu", "silu": "silu"}[cfg.activation]
    return T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_num_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.layer_norm_eps,
        feed_forward_proj=("gated-" if cfg.gated else "") + act,
        tie_word_embeddings=cfg.tie_embeddings, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)


def random_batch(batch: int, inputs_len: int, targets_len: int, vocab: int, seed: int = 0):
    """Full-length random token batch (no padding): numpy int32 arrays."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab, size=(batch, inputs_len), dtype=np.int32)
    tgt = rng.integers(2, vocab, size=(batch, targets_len), dtype=np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
            "decoder_input_tokens": dec_in,
            "decoder_loss_weights": np.ones_like(tgt, dtype=np.int32)}


def build_hf_model(cfg: ModelConfig):
    """A randomly initialised transformers T5 with the shape of `cfg`.

    transformers 5.x always ties `lm_head` to the shared embedding on construction (its T5Config
    forces tie_word_embeddings=True and keeps only "scale the decoder output or not"), so an
    untied T5 v1.1 model is made by giving `lm_head` its own weight, as a v1.1 checkpoint does
    when loaded.
    """
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(hf_config(cfg))
    if not cfg.tie_embeddings:
        weight = torch.empty_like(model.shared.weight).normal_(0.0, 1.0)
        model.lm_head.weight = torch.nn.Parameter(weight)
    return model


class HFTrainStep:
    """One AdamW step of transformers' T5 on a fixed batch; `time()` returns seconds per step.

    `autocast="bfloat16"` runs the forward pass (and so the backward's matmuls) under
    `torch.autocast("cpu", torch.bfloat16)` with float32 weights and optimizer state: PyTorch's
    mixed precision, what transformers' Trainer does with `bf16=True` on a CPU, and the
    counterpart of t5lite's `ModelConfig.dtype="bfloat16"` (float32 parameters, bfloat16 compute).
    """

    def __init__(self, cfg: ModelConfig, batch: dict, threads: int | None = None, seed: int = 0,
                 autocast: str | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.model = build_hf_model(cfg).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.inputs = torch.from_numpy(batch["encoder_input_tokens"]).long()
        self.labels = torch.from_numpy(batch["decoder_target_tokens"]).long()
        self.dec_in = torch.from_numpy(batch["decoder_input_tokens"]).long()
        self.autocast = autocast

    def step(self) -> float:
        with self.torch.autocast("cpu", dtype=getattr(self.torch, self.autocast or "float32"),
                                 enabled=self.autocast is not None):
            out = self.model(input_ids=self.inputs, decoder_input_ids=self.dec_in,
                             labels=self.labels)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def time(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times

    @property
    def num_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))


class HFTrainStepProcess:
    """`HFTrainStep` in a Python process of its own, driven over a pipe: `time(n)` runs n
    steps there and returns their times, measured there.

    A user runs one framework per process. Sharing one with t5lite gives both the allocator
    t5lite re-executed itself with and lets each framework's heap use shape the other's (README,
    "AMD EPYC (Zen 5)": "One framework per process"). In a separate process each side keeps its
    own heap, while the steps still alternate in time on the same cores. `env` is the worker's environment (default: this one); the benchmarks pass
    `host_malloc.environment_as_started`, so transformers runs with the allocator its user's
    shell gives it rather than the one t5lite re-executed itself with.
    """

    def __init__(self, cfg: ModelConfig, batch: dict, threads: int | None = None,
                 seed: int = 0, autocast: str | None = None,
                 env: dict[str, str] | None = None):
        with tempfile.NamedTemporaryFile("wb", suffix=".pkl", delete=False) as f:
            pickle.dump({"cfg": cfg, "batch": batch, "threads": threads, "seed": seed,
                         "autocast": autocast}, f)
            self._spec = f.name
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--train_worker", self._spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        ready = self._reply()
        self.num_params = ready["num_params"]
        self.worker_env = ready["env"]  # the allocator variables the worker saw
        self.worker_pid = ready["pid"]

    def _reply(self) -> dict:
        """The worker's next protocol line (other output is passed on to stderr)."""
        for line in self.proc.stdout:
            if line.startswith(WORKER_PREFIX):
                return json.loads(line[len(WORKER_PREFIX):])
            sys.stderr.write(line)
        self.close()
        raise RuntimeError(f"the transformers train worker exited (status "
                           f"{self.proc.returncode}) before answering; its errors are above")

    def time(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._reply()["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self._spec):
            os.unlink(self._spec)


def train_worker(spec_path: str) -> None:
    """The worker side of `HFTrainStepProcess`: builds the step, answers `ready`, then runs
    the number of steps each stdin line asks for until stdin closes."""
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    step = HFTrainStep(spec["cfg"], spec["batch"], threads=spec["threads"], seed=spec["seed"],
                       autocast=spec["autocast"])
    ready = {"num_params": step.num_params, "env": allocator_variables(os.environ),
             "pid": os.getpid()}
    print(WORKER_PREFIX + json.dumps(ready), flush=True)
    for line in sys.stdin:
        print(WORKER_PREFIX + json.dumps({"times": step.time(int(line))}), flush=True)


class HFGenerate:
    """Greedy `generate` of transformers' T5 (KV cache on), fixed number of new tokens."""

    def __init__(self, model, input_ids: np.ndarray, new_tokens: int):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.input_ids = torch.from_numpy(input_ids).long()
        self.new_tokens = new_tokens

    def run(self):
        with self.torch.no_grad():
            return self.model.generate(
                input_ids=self.input_ids, attention_mask=(self.input_ids != 0).long(),
                do_sample=False, num_beams=1, max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens, use_cache=True)

    def time(self, repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.run()
            times.append(time.perf_counter() - start)
        return times


def median(values: list[float]) -> float:
    return statistics.median(values)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--train_worker":
        raise SystemExit("usage: hf_reference.py --train_worker SPEC.pkl (started by "
                         "HFTrainStepProcess)")
    train_worker(sys.argv[2])
