"""Pieces every stage config shares: argument parsing, model presets, data sources, meshes."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from gptstack.config import PRESETS, GPTConfig, MeshConfig, OptimConfig


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `'size=mini,runlocal'` into a ConfigDict over `defaults` (a bare name means True).

    Values take the type of their default; an unknown name is an error.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, _, value = item.partition('=')
        if key not in defaults:
            raise ValueError(f'config argument {key!r}: expected one of {sorted(defaults)}')
        default = defaults[key]
        if not value:
            value = True
        elif isinstance(default, bool):
            value = value.lower() in ('1', 'true', 'yes')
        elif default is not None:
            value = type(default)(value)
        result[key] = value
    return result


def _typed_fields(cls, values: dict) -> ml_collections.ConfigDict:
    """A ConfigDict with every field of dataclass `cls`; None values become typed placeholders
    so that `--config.model.d_ff=1024` still parses as an int."""
    out = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        value = values.get(field.name, field.default)
        if value is None:  # typed by the annotation ('int', 'float | None', ...)
            kind = {'int': int, 'float': float, 'bool': bool}.get(
                str(field.type).removesuffix(' | None'), str)
            value = config_dict.placeholder(kind)
        out[field.name] = value
    return out


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
    """The `GPTConfig` fields of a preset that say what the parameters are; `vocab_size` None
    means "the tokenizer's". The dtypes the model computes in are the stage's `precision`."""
    if preset not in PRESETS:
        raise ValueError(f'model preset {preset!r}: expected one of {sorted(PRESETS)}')
    values = {**PRESETS[preset], **overrides}
    config = _typed_fields(GPTConfig, values)
    for name in ('dtype', 'matmul_dtype'):
        del config[name]
    return config


# The dtypes a stage computes in (`gptstack.environment.PRECISIONS`): float32, mixed (bfloat16
# matmul inputs) or bfloat16; auto picks the fastest that keeps the loss equal on the platform.
PRECISION = 'auto'


def mesh_config(**overrides) -> ml_collections.ConfigDict:
    return _typed_fields(MeshConfig, overrides)


def optim_config(**overrides) -> ml_collections.ConfigDict:
    return _typed_fields(OptimConfig, overrides)


def train_config(total_steps: int, *, eval_every: int, sample_every: int,
                 checkpoint_every: int) -> ml_collections.ConfigDict:
    """The host loop's cadence (`gptstack.loop.LoopConfig`) plus checkpoint retention."""
    return ml_collections.ConfigDict({
        'total_steps': total_steps,
        'log_every': 10,
        'eval_every': eval_every,
        'sample_every': sample_every,
        'checkpoint_every': checkpoint_every,
        # Checkpoints kept besides the best one by validation loss.
        'keep_checkpoints': 2,
        # A non-finite loss or gradient: 'stop', or 'skip' the batch (at most
        # max_nonfinite_skips).
        'on_nonfinite': 'stop',
        'max_nonfinite_skips': 10,
        # Early stopping: evaluations in a row without a lower val_loss (0: never stop early).
        'patience': 0,
    })


# The worked examples' share of the default mixture's tokens: at 0.5 the SFT model of the main
# job solves more held-out tasks than at 0.3 or 0 for the same compute (docs/results.md).
WORKED_SHARE = 0.5


def embedded_sources(code_weight: float = 0.8,
                     worked_weight: float = WORKED_SHARE) -> ml_collections.ConfigDict:
    """The zero-download mixture: Python's standard library (code), the English prose that ships
    with Python, and (with `worked_weight` > 0) solved instruction tasks written as plain text,
    the role of the LLaMA table's StackExchange rows; code and prose share what the worked
    examples leave, `code_weight` to the code."""
    rest = 1 - worked_weight
    sources = {
        'code': {'paths': 'embedded:python_code', 'weight': round(rest * code_weight, 6)},
        'prose': {'paths': 'embedded:python_prose', 'weight': round(rest * (1 - code_weight), 6)},
    }
    if worked_weight > 0:
        sources['worked'] = {'paths': 'embedded:worked_examples', 'weight': worked_weight}
    return ml_collections.ConfigDict(sources)


def tokenizer_config(vocab_size: int = 8192) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # An existing tokenizer.model to use; None trains one on the data sources.
        'path': config_dict.placeholder(str),
        'vocab_size': vocab_size,
        # Lines sampled from the corpus to learn the merges from.
        'max_lines': 300_000,
    })
