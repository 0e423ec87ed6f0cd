"""Finding SeqIO tasks, mixtures and their vocabularies by name, with clear errors.

Tasks live in modules that register them on import (`t5lite_tasks` holds the bundled ones);
the core library never imports them by itself. Typical use::

    import_task_modules(["t5lite_tasks"])
    task = get_task_or_mixture("demo_ul2")
    vocab = get_vocabulary("demo_ul2")            # seqio.SentencePieceVocabulary, 100 extra ids
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import seqio

from t5lite.errors import UserError

# Sequence lengths a task is meant to be shown/trained with when none are given.
_DEFAULT_SEQUENCE_LENGTHS: dict[str, dict[str, int]] = {}
FALLBACK_SEQUENCE_LENGTH = {"inputs": 512, "targets": 114}


def import_task_modules(modules: Sequence[str]) -> None:
    """Import modules that register tasks (e.g. "t5lite_tasks"). Importing twice is harmless."""
    for name in modules:
        name = name.strip()
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise UserError(
                    f"cannot import task module {name!r}: no such module. The bundled tasks are "
                    "in `t5lite_tasks` (installed by `pip install -e .`); a module of your own "
                    "must be on PYTHONPATH") from None
            raise


def registered_names() -> list[str]:
    """All registered task and mixture names, sorted."""
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`; `UserError` listing the registered names if none."""
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    names = registered_names()
    listing = ", ".join(names) if names else "(none: import a task module first, e.g. t5lite_tasks)"
    raise UserError(f"unknown task or mixture {name!r}; registered: {listing}")


def get_vocabulary(name: str) -> seqio.Vocabulary:
    """The output ("targets") vocabulary of task or mixture `name`."""
    provider = get_task_or_mixture(name)
    features = provider.output_features
    if "targets" not in features:
        raise UserError(f"task {name!r} has no 'targets' feature; features: {sorted(features)}")
    vocab = features["targets"].vocabulary
    inputs = features.get("inputs")
    if inputs is not None and inputs.vocabulary != vocab:
        raise UserError(f"task {name!r} uses different vocabularies for inputs and targets; "
                        "t5lite models share one vocabulary")
    return vocab


def set_default_sequence_length(name: str, lengths: Mapping[str, int]) -> None:
    _DEFAULT_SEQUENCE_LENGTHS[name] = dict(lengths)


def default_sequence_length(name: str) -> dict[str, int]:
    """The sequence lengths registered with task `name`, else inputs 512 / targets 114."""
    return dict(_DEFAULT_SEQUENCE_LENGTHS.get(name, FALLBACK_SEQUENCE_LENGTH))


def parse_sequence_length(text: str) -> dict[str, int]:
    """Parse T5X-style lengths: "inputs:512,targets:114" -> {"inputs": 512, "targets": 114}."""
    out: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        if not sep or not key.strip():
            raise UserError(f"bad sequence length {part!r} in {text!r}; expected NAME:LENGTH "
                            "pairs such as inputs:512,targets:114")
        try:
            length = int(value)
        except ValueError:
            raise UserError(f"sequence length for {key.strip()!r} must be an integer, got "
                            f"{value!r}") from None
        if length <= 0:
            raise UserError(f"sequence length for {key.strip()!r} must be positive, got {length}")
        out[key.strip()] = length
    if not out:
        raise UserError(f"no sequence lengths in {text!r}; expected e.g. inputs:512,targets:114")
    return out
