"""Denoising objectives as configuration: T5 span corruption, prefix LM and the UL2 mixture.

An objective is a tuple of `Denoiser`s with mixing rates. Each document goes to exactly one
denoiser, which cuts it into chunks of its own length and corrupts them; the paradigm token, if
any, is prepended afterwards at encoder position 0 and is never masked. Rates are shares of the
*examples* the model sees (`rate_unit="examples"`, the default, like SeqIO mixture rates): a
document of n tokens goes to denoiser k with probability proportional to rate_k / e_k(n), where
e_k(n) is the number of examples k makes of it (n / T_k when k concatenates documents into chunks
of T_k tokens, ceil(n / L_k) when it cuts each document into chunks of L_k), so every document
contributes examples in the configured proportions. With `rate_unit="documents"` rates are shares
of documents instead (UL2's appendix code: one denoiser per document shard). `plan()` turns an objective plus sequence lengths and a vocabulary into the
exact per-denoiser chunk lengths, and refuses configurations that cannot work (too few sentinels,
a targets length that would silently cut the targets, a length too short to corrupt).

Example (the UL2 default at 402 inputs, paradigm token included)::

    plan = ul2().plan({"inputs": 402, "targets": 402}, vocab)
    [(d.name, p.chunk_length, p.targets_length) for d, p in zip(plan.denoisers, plan.lengths)]
    # [('R(mu=3,d=0.15)', 445, 90), ..., ('X(mu=3,d=0.5)', 600, 401), ..., ('S(d=0.25)', 399, 201)]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

from t5lite.data import objectives
from t5lite.errors import ConfigError

SPAN, PREFIX = "span", "prefix"
RATE_UNITS = ("examples", "documents")


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One denoiser. `kind` is "span" (T5 span corruption: noise_density d, mean span length μ)
    or "prefix" (prefix LM; d=0.5 gives a uniform split point). `paradigm` is the token string
    prepended to the encoder input after corruption (UL2: "[NLU]", "[NLG]", "[S2S]"), or None.
    `rate` is this denoiser's relative share of the mixture (see `DenoisingObjective`)."""

    kind: str
    noise_density: float
    mean_noise_span_length: float = 3.0
    paradigm: str | None = None
    rate: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in (SPAN, PREFIX):
            raise ConfigError(f"Denoiser kind must be {SPAN!r} or {PREFIX!r}, got {self.kind!r}")
        if self.kind == SPAN and not 0 < self.noise_density < 1:
            raise ConfigError(f"span noise_density must be in (0, 1), got {self.noise_density}")
        if self.kind == PREFIX and not 0 <= self.noise_density <= 0.5:
            raise ConfigError("prefix-LM noise_density must be in [0, 0.5] (0.5: uniform split "
                              f"point), got {self.noise_density}")
        if self.kind == SPAN and self.mean_noise_span_length < 1:
            raise ConfigError(
                f"mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}")
        if not self.rate >= 0:
            raise ConfigError(f"denoiser rate must be >= 0, got {self.rate}")

    @property
    def name(self) -> str:
        tag = {"[NLU]": "R", "[NLG]": "X", "[S2S]": "S"}.get(self.paradigm or "", "")
        if self.kind == PREFIX:
            return f"{tag or 'prefix_lm'}(d={self.noise_density:g})"
        body = f"mu={self.mean_noise_span_length:g},d={self.noise_density:g}"
        return f"{tag or 'span'}({body})"


@dataclasses.dataclass(frozen=True)
class DenoiserLengths:
    """What one denoiser does at given sequence lengths."""

    paradigm_ids: tuple[int, ...]  # ids prepended to the inputs (after corruption)
    chunk_length: int  # raw tokens per chunk
    targets_length: int  # longest targets, EOS included
    sentinels: int  # sentinels needed by a full chunk
    concatenate: bool  # chunks span document boundaries (span corruption) or not (prefix LM)


@dataclasses.dataclass(frozen=True)
class Plan:
    denoisers: tuple[Denoiser, ...]
    lengths: tuple[DenoiserLengths, ...]
    vocab_size: int
    rate_unit: str = "examples"

    @property
    def probabilities(self) -> tuple[float, ...]:
        total = sum(d.rate for d in self.denoisers)
        return tuple(d.rate / total for d in self.denoisers)


def paradigm_ids(vocab, token: str | None) -> tuple[int, ...]:
    """Ids of a paradigm token: one id when the vocabulary has it as a piece (vocabularies made
    by `t5lite vocab` do); otherwise its ordinary encoding, with a warning."""
    from t5lite.data.vocab import piece_id

    if token is None:
        return ()
    pid = piece_id(vocab, token)
    if pid is not None:
        return (pid,)
    ids = tuple(int(i) for i in vocab.encode(token))
    logging.warning("vocabulary has no single piece %r (train one with `t5lite vocab` to get "
                    "it): the paradigm token is encoded as %d ids %s", token, len(ids), ids)
    return ids


def _sentinels_needed(d: Denoiser, inputs_length: int) -> int:
    chunk, _ = objectives.random_spans_helper(inputs_length, d.noise_density,
                                              d.mean_noise_span_length)
    return objectives.num_noise_and_spans(chunk, d.noise_density, d.mean_noise_span_length)[1]


def _longest_inputs_within(extra_ids: int, d: Denoiser, prefix: int, upper: int) -> int:
    """The longest inputs length (<= upper) at which span denoiser `d` needs at most
    `extra_ids` sentinels (binary search; the count grows with the length)."""
    lo, hi = prefix + 3, upper
    if _sentinels_needed(d, lo - prefix) > extra_ids:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _sentinels_needed(d, mid - prefix) <= extra_ids:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclasses.dataclass(frozen=True)
class DenoisingObjective:
    """A mixture of denoisers (one denoiser: plain span corruption or prefix LM)."""

    denoisers: tuple[Denoiser, ...]
    name: str = "denoising"
    rate_unit: str = "examples"  # or "documents"

    def __post_init__(self) -> None:
        if not self.denoisers:
            raise ConfigError("an objective needs at least one denoiser")
        if self.rate_unit not in RATE_UNITS:
            raise ConfigError(f"rate_unit must be one of {RATE_UNITS}, got {self.rate_unit!r}")
        object.__setattr__(self, "denoisers", tuple(self.denoisers))
        if sum(d.rate for d in self.denoisers) <= 0:
            raise ConfigError("denoiser rates must not all be zero")

    def plan(self, sequence_length: Mapping[str, int], vocab) -> Plan:
        """Exact chunk and target lengths per denoiser; `ConfigError` if the lengths or the
        vocabulary cannot serve this objective."""
        if not sequence_length or "inputs" not in sequence_length or \
                "targets" not in sequence_length:
            raise ConfigError(f"objective {self.name!r} needs sequence lengths for 'inputs' and "
                              f"'targets' (e.g. inputs:512,targets:114), got {sequence_length}")
        inputs_length = int(sequence_length["inputs"])
        targets_length = int(sequence_length["targets"])
        out = []
        for d in self.denoisers:
            ids = paradigm_ids(vocab, d.paradigm)
            room = inputs_length - len(ids)  # encoder tokens left for the corrupted chunk + EOS
            if d.kind == SPAN:
                try:
                    chunk, targets = objectives.random_spans_helper(
                        room, d.noise_density, d.mean_noise_span_length)
                except ValueError as e:
                    raise ConfigError(f"{self.name}: denoiser {d.name} cannot work with "
                                      f"inputs length {inputs_length}: {e}") from None
                _, spans = objectives.num_noise_and_spans(chunk, d.noise_density,
                                                          d.mean_noise_span_length)
                if spans > vocab.extra_ids:
                    fits = _longest_inputs_within(vocab.extra_ids, d, len(ids), inputs_length)
                    raise ConfigError(
                        f"{self.name}: denoiser {d.name} at inputs length {inputs_length} cuts "
                        f"chunks of {chunk} tokens with {spans} noise spans, so it needs {spans} "
                        f"sentinels, but the vocabulary has {vocab.extra_ids} extra ids; use "
                        f"inputs length <= {fits}, or a vocabulary with at least {spans} extra "
                        f"ids (seqio.SentencePieceVocabulary(path, extra_ids={spans}))")
                out.append(DenoiserLengths(ids, chunk, targets, spans, concatenate=True))
            else:
                chunk = room - 1  # room for EOS
                if chunk < 2:
                    raise ConfigError(f"{self.name}: inputs length {inputs_length} is too short "
                                      f"for denoiser {d.name} (needs at least {len(ids) + 3})")
                min_prefix, _ = objectives.prefix_bounds(chunk, d.noise_density)
                targets = chunk - min_prefix + 1
                out.append(DenoiserLengths(ids, chunk, targets, 0, concatenate=False))
            if out[-1].targets_length > targets_length:
                raise ConfigError(
                    f"{self.name}: targets length {targets_length} is too short: denoiser "
                    f"{d.name} at inputs length {inputs_length} makes targets of up to "
                    f"{out[-1].targets_length} tokens (EOS included); set targets to at least "
                    f"{max(x.targets_length for x in out)}")
        return Plan(self.denoisers, tuple(out), vocab.vocab_size, self.rate_unit)

    def min_targets_length(self, inputs_length: int, vocab) -> int:
        """The smallest targets length that `plan` accepts for `inputs_length`."""
        plan = self.plan({"inputs": inputs_length, "targets": 1 << 30}, vocab)
        return max(x.targets_length for x in plan.lengths)


def span_corruption(noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> DenoisingObjective:
    """T5 span corruption (default d=0.15, μ=3: 568 raw tokens -> 512 inputs, 114 targets)."""
    return DenoisingObjective((Denoiser(SPAN, noise_density, mean_noise_span_length),),
                              name="span_corruption")


def prefix_lm(noise_density: float = 0.5) -> DenoisingObjective:
    """T5 prefix LM: chunks of `inputs - 1` tokens split at a random point."""
    return DenoisingObjective((Denoiser(PREFIX, noise_density),), name="prefix_lm")


# The seven UL2 denoisers (R, R, X, X, X, X, S) in the paper's order.
def _ul2_denoisers(s_noise_density: float) -> list[Denoiser]:
    return [
        Denoiser(SPAN, 0.15, 3.0, "[NLU]"),
        Denoiser(SPAN, 0.15, 8.0, "[NLU]"),
        Denoiser(SPAN, 0.5, 3.0, "[NLG]"),
        Denoiser(SPAN, 0.5, 8.0, "[NLG]"),
        Denoiser(SPAN, 0.15, 64.0, "[NLG]"),
        Denoiser(SPAN, 0.5, 64.0, "[NLG]"),
        Denoiser(PREFIX, s_noise_density, paradigm="[S2S]"),
    ]


UL2_UNIFORM_RATES = (1, 1, 1, 1, 1, 1, 1)
# UL2R-style: 50 % S, 25 % R (μ=3, d=0.15), 25 % X (shared by the four X denoisers).
UL2R_RATES = (0.25, 0.0, 0.0625, 0.0625, 0.0625, 0.0625, 0.5)


def ul2(rates: Sequence[float] | str = "uniform", s_noise_density: float = 0.25,
        rate_unit: str = "examples") -> DenoisingObjective:
    """The UL2 mixture of denoisers: R (μ=3/8, d=0.15, `[NLU]`), X (μ=3/8, d=0.5; μ=64,
    d=0.15/0.5, `[NLG]`), S (prefix LM, `[S2S]`). `rates`: "uniform" (the paper's appendix code),
    "ul2r" (50 % S, 25 % R, 25 % X) or seven numbers in the order above; they are shares of
    examples, or of documents with `rate_unit="documents"`."""
    if isinstance(rates, str):
        presets = {"uniform": UL2_UNIFORM_RATES, "ul2r": UL2R_RATES}
        if rates not in presets:
            raise ConfigError(f"unknown UL2 rates preset {rates!r}; use one of {sorted(presets)} "
                              "or seven numbers")
        rates = presets[rates]
    rates = tuple(float(r) for r in rates)
    if len(rates) != 7:
        raise ConfigError(f"UL2 needs seven rates (R3, R8, X3, X8, X64a, X64b, S), got {rates}")
    denoisers = tuple(dataclasses.replace(d, rate=r)
                      for d, r in zip(_ul2_denoisers(s_noise_density), rates) if r > 0)
    return DenoisingObjective(denoisers, name="ul2", rate_unit=rate_unit)
