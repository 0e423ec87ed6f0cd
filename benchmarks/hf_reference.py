"""The `transformers` (PyTorch, CPU) side of the side-by-side benchmarks.

Builds `T5ForConditionalGeneration` with the same shape as a t5lite `ModelConfig` (T5 v1.1
layout: gated-GELU, untied, relative bias), and times an AdamW train step and greedy `generate`
exactly as a user of transformers would run them.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from t5lite.config import ModelConfig


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
