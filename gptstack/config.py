"""Typed, validated configuration for the model, the device mesh and the optimizer.

- Configs are frozen, slotted dataclasses; an invalid combination fails at construction with a
  `ConfigError` that names the field, so nothing expensive starts on a bad config.
- `from_dict` is the one place an `ml_collections.ConfigDict` (or any mapping) becomes typed; an
  unknown key is an error, never silently ignored. Model code never sees ml_collections.
- `flatten` turns a stage config into `{dotted key: value}`, the form in which two runs' settings
  are compared.
- `KEY_BOUNDS` gives every numeric key of the stage configs that no dataclass above checks its
  range; `check_bounds` applies it to whichever of those keys a config has.
- `PRESETS` holds the model sizes, from a toy up to the two reference rows of the "State of GPT"
  talk (GPT-3 175B and LLaMA 65B).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

FAMILIES = ('gpt', 'llama')
DTYPES = ('float32', 'bfloat16')
RULE_PRESETS = ('dp', 'fsdp', 'fsdp_tp')


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _from_mapping(cls, values: Mapping[str, Any] | Any, **overrides):
    """Builds dataclass `cls` from a mapping (or ConfigDict), rejecting unknown keys by name."""
    if hasattr(values, 'to_dict'):
        values = values.to_dict()
    values = {**dict(values), **overrides}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown,
             f'{cls.__name__}: unknown key(s) {unknown}; expected some of {sorted(known)}')
    return cls(**values)


# `GPTConfig` fields that choose how the model computes, not what its parameters are: a
# checkpoint continues under any of them (finetune a float32 run in the mixed policy, turn on
# rematerialisation after a restart).
COMPUTE_FIELDS = ('dtype', 'matmul_dtype', 'remat', 'scan_layers', 'attention')
# How a sequence attends to itself (training, scoring, prefill): this repository's kernel
# (`gptstack.ops.dot_product_attention`, tuned for XLA:CPU), or `jax.nn.dot_product_attention`
# with its XLA or cuDNN implementation (`gptstack.environment.attention`). Decoding from a KV
# cache always uses the first.
ATTENTION = ('gptstack', 'xla', 'cudnn')


@dataclasses.dataclass(frozen=True, slots=True)
class GPTConfig:
    """Shape and architecture of a decoder-only transformer.

    `family='gpt'` is the GPT-2/GPT-3 layout (learned positions, LayerNorm, GELU, optional biases);
    `family='llama'` is the LLaMA layout (RoPE, RMSNorm, SwiGLU, grouped-query attention through
    `n_kv_head`). Derived sizes (`d_ff`, `n_kv_head`) are filled in by `__post_init__`.
    """

    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    max_seq_len: int
    family: Literal['gpt', 'llama'] = 'gpt'
    # Key/value heads for grouped-query attention; None means one per query head (plain MHA).
    n_kv_head: int | None = None
    # MLP hidden width; None means 4*d_model (gpt) or LLaMA's rounded 8/3*d_model (llama).
    d_ff: int | None = None
    # LLaMA rounds the SwiGLU width up to a multiple of this (256 in the paper).
    ffn_multiple_of: int = 256
    # Biases on the linear layers and norms (GPT-2/3 have them; LLaMA does not).
    use_bias: bool = True
    # Biases on the query, key and value projections (Qwen2 has only these); None: `use_bias`.
    qkv_bias: bool | None = None
    # Share the token embedding with the output projection (GPT-2 does, LLaMA does not).
    tie_embeddings: bool = True
    # Smeared keys (Olsson et al., 2022): each head's key mixes in the previous token's key by a
    # learned weight, so one layer can attend to the token after an earlier copy of the current
    # one (an induction head) without first learning a previous-token head.
    smeared_keys: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    # Standard deviation of the normal initializer; residual projections get /sqrt(2*n_layer).
    init_std: float = 0.02
    # Parameter storage dtype and activation/compute dtype; logits and softmax are always float32.
    param_dtype: str = 'float32'
    dtype: str = 'float32'
    # The dtype of matmul inputs (None: `dtype`); products always accumulate in float32.
    # bfloat16 matmuls with float32 activations is the fast policy on CPUs with bf16 matrix
    # units, where elementwise bfloat16 work is slow; accelerators use `dtype='bfloat16'`.
    matmul_dtype: str | None = None
    # Recompute each block's activations in the backward pass instead of storing them.
    remat: bool = False
    # Run the blocks as one `lax.scan` over their stacked parameters: compile time independent of
    # depth. False unrolls them, which spares the scan's stacked buffers of saved activations
    # (faster for shallow models on CPU, at a compile time that grows with depth).
    scan_layers: bool = True
    # `ATTENTION`: which implementation a sequence attending to itself runs.
    attention: str = 'gptstack'

    def __post_init__(self):
        for name in ('vocab_size', 'n_layer', 'd_model', 'n_head', 'max_seq_len'):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0,
                     f'GPTConfig.{name}={value!r}: expected a positive integer')
        _require(self.family in FAMILIES,
                 f'GPTConfig.family={self.family!r}: expected one of {FAMILIES}')
        _require(self.d_model % self.n_head == 0,
                 f'GPTConfig.n_head={self.n_head} must divide d_model={self.d_model}')
        if self.n_kv_head is None:
            object.__setattr__(self, 'n_kv_head', self.n_head)
        _require(isinstance(self.n_kv_head, int) and self.n_kv_head > 0,
                 f'GPTConfig.n_kv_head={self.n_kv_head!r}: expected a positive integer')
        _require(self.n_head % self.n_kv_head == 0,
                 f'GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}')
        if self.family == 'llama':
            _require(self.head_dim % 2 == 0,
                     f'GPTConfig: RoPE needs an even head_dim, got d_model/n_head={self.head_dim}')
        if self.qkv_bias is None:
            object.__setattr__(self, 'qkv_bias', self.use_bias)
        if self.d_ff is None:
            object.__setattr__(self, 'd_ff', self._default_d_ff())
        _require(isinstance(self.d_ff, int) and self.d_ff > 0,
                 f'GPTConfig.d_ff={self.d_ff!r}: expected a positive integer')
        _require(self.norm_eps > 0, f'GPTConfig.norm_eps={self.norm_eps}: expected > 0')
        if self.matmul_dtype is None:
            object.__setattr__(self, 'matmul_dtype', self.dtype)
        for name in ('param_dtype', 'dtype', 'matmul_dtype'):
            _require(getattr(self, name) in DTYPES,
                     f'GPTConfig.{name}={getattr(self, name)!r}: expected one of {DTYPES}')
        _require(self.attention in ATTENTION,
                 f'GPTConfig.attention={self.attention!r}: expected one of {ATTENTION}')

    def _default_d_ff(self) -> int:
        if self.family == 'gpt':
            return 4 * self.d_model
        hidden = int(2 * 4 * self.d_model / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_dict(cls, values, **overrides) -> GPTConfig:
        return _from_mapping(cls, values, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """The named size from `PRESETS`, with fields overridden (derived sizes follow)."""
        _require(name in PRESETS, f'model preset {name!r}: expected one of {sorted(PRESETS)}')
        return _from_mapping(cls, PRESETS[name], **overrides)


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
    """Device mesh `('data', 'fsdp', 'tensor')`; one axis may be -1 to take the remaining devices.

    `rules` picks how logical axis names map onto mesh axes (see `gptstack.sharding.RULES`).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: Literal['dp', 'fsdp', 'fsdp_tp'] = 'fsdp'

    def __post_init__(self):
        for name in ('data', 'fsdp', 'tensor'):
            value = getattr(self, name)
            _require(isinstance(value, int) and (value == -1 or value >= 1),
                     f'MeshConfig.{name}={value!r}: expected a positive integer or -1 (fill)')
        _require(self.shape.count(-1) <= 1,
                 f'MeshConfig: at most one axis may be -1, got data={self.data}, '
                 f'fsdp={self.fsdp}, tensor={self.tensor}')
        _require(self.rules in RULE_PRESETS,
                 f'MeshConfig.rules={self.rules!r}: expected one of {RULE_PRESETS}')

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @classmethod
    def from_dict(cls, values, **overrides) -> MeshConfig:
        return _from_mapping(cls, values, **overrides)


@dataclasses.dataclass(frozen=True, slots=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay, global-norm clipping and gradient accumulation."""

    lr: float = 3e-4
    # Final learning rate as a fraction of `lr` at the end of the cosine.
    end_lr_ratio: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # Decoupled weight decay on matrices only (biases, norm scales stay undecayed).
    weight_decay: float = 0.1
    # Clip the global gradient norm to this value; 0 disables clipping.
    grad_clip: float = 1.0
    # Micro-batches per step: the batch is split and gradients summed inside one jitted step.
    accum_steps: int = 1

    def __post_init__(self):
        _require(self.lr > 0, f'OptimConfig.lr={self.lr}: expected > 0')
        _require(0 <= self.end_lr_ratio <= 1,
                 f'OptimConfig.end_lr_ratio={self.end_lr_ratio}: expected in [0, 1]')
        _require(isinstance(self.total_steps, int) and self.total_steps >= 1,
                 f'OptimConfig.total_steps={self.total_steps!r}: expected a positive integer')
        _require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.total_steps,
                 f'OptimConfig.warmup_steps={self.warmup_steps!r}: expected an integer in '
                 f'[0, total_steps={self.total_steps})')
        _require(self.grad_clip >= 0, f'OptimConfig.grad_clip={self.grad_clip}: expected >= 0')
        _require(self.weight_decay >= 0,
                 f'OptimConfig.weight_decay={self.weight_decay}: expected >= 0')
        _require(isinstance(self.accum_steps, int) and self.accum_steps >= 1,
                 f'OptimConfig.accum_steps={self.accum_steps!r}: expected a positive integer')

    @classmethod
    def from_dict(cls, values, **overrides) -> OptimConfig:
        return _from_mapping(cls, values, **overrides)


# --- ranges of the stage configs' other numeric keys ----------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """The values a numeric key takes: `[low, high]`, either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = True
    why: str = ''

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        kind = 'an integer' if self.integer else 'a number'
        if self.low is not None and self.high is not None:
            ends = ('(' if self.low_open else '[') + f'{self.low:g}, {self.high:g}' + (
                ')' if self.high_open else ']')
            text = f'{kind} in {ends}'
        elif self.low is not None:
            text = (f'{kind} > {self.low:g}' if self.low_open else
                    f'at least {self.low:g}' if self.integer else f'{kind} >= {self.low:g}')
        else:
            text = kind
        return f'{text} ({self.why})' if self.why else text


def _count(least: int, why: str = '') -> Bounds:
    return Bounds(low=least, why=why)


def _number(low=None, high=None, low_open=False, high_open=False, why='') -> Bounds:
    return Bounds(low, high, low_open, high_open, integer=False, why=why)


_FRACTION = _number(0, 1, high_open=True)
_TEMPERATURE = _number(0, why='0 is greedy')
KEY_BOUNDS: dict[str, Bounds] = {
    'seed': _count(0),
    # Data of every stage.
    'data.batch_size': _count(1, 'rows or groups per step'),
    'data.seq_len': _count(2, 'a row needs a token and the token it predicts'),
    'data.eval_batches': _count(1, 'the held-out evaluation needs a batch'),
    'data.copy_batches': _count(0, '0 turns the copying evaluation off'),
    'data.max_new_tokens': _count(1, 'a reply needs a token'),
    'data.max_skips': _count(0),
    'data.val_fraction': _FRACTION,
    'data.train_tasks': _count(0),
    'data.copy_drills': _count(0),
    'data.validation_tasks': _count(1),
    'data.train_prompts': _count(1),
    'data.validation_prompts': _count(1),
    'data.completions': _count(2, 'a comparison needs at least 2 completions'),
    'tokenizer.vocab_size': _count(1),
    'tokenizer.max_lines': _count(1),
    # Sampling during pretraining, and the held-out evaluations.
    'sample.max_new_tokens': _count(1),
    'sample.temperature': _TEMPERATURE,
    'sample.top_k': _count(0, '0 keeps every token'),
    'sample.top_p': _number(0, 1, low_open=True),
    'eval.batch_size': _count(1),
    'eval.gold_prompts': _count(0),
    'eval.max_new_tokens': _count(1),
    'eval.temperature': _TEMPERATURE,
    'eval.prompts': _count(0, '0 skips the held-out evaluation'),
    'eval.samples': _count(1),
    # The reward stage: the labeler, its loss and best-of-N.
    'labeler.noise': _number(0, why='0 ranks exactly by the gold score'),
    'labeler.temperature': _TEMPERATURE,
    'labeler.max_new_tokens': _count(1),
    'labeler.batch_size': _count(1),
    'labeler.oversample': _count(1),
    'loss.margin': _number(0),
    'best_of_n.prompts': _count(0, '0 skips best-of-N'),
    'best_of_n.temperature': _TEMPERATURE,
    'best_of_n.max_n': _count(1),
    'best_of_n.batch_size': _count(1),
    # RL: the format bonus of verifiable rewards, and PPO-ptx rows.
    'rl.format_reward': _number(0, why='0 turns it off'),
    'rl.ptx.batch_size': _count(1),
    'rl.ptx.seq_len': _count(2),
    # The pipeline's comparison.
    'compare.prompts': _count(1),
    'compare.samples': _count(1),
    'compare.base_samples': _count(1),
    'compare.best_of': _count(1),
    'compare.few_shot': _count(0),
    'compare.max_new_tokens': _count(1),
    'compare.batch_size': _count(1),
    'compare.examples': _count(0),
}


def check_bounds(config) -> None:
    """Checks every key of `KEY_BOUNDS` that `config` has (unset placeholders aside), naming the
    first one out of range."""
    for key, bounds in KEY_BOUNDS.items():
        value = config
        for part in key.split('.'):
            if not hasattr(value, 'keys') or part not in value:
                break
            value = value[part]
        else:
            _require(value is None or bounds.holds(value),
                     f'{key}={value!r}: expected {bounds.describe()}')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """`{dotted key: value}` of a nested mapping (a config's `to_dict()`), each value as JSON
    holds it (tuples become lists), so settings read back from a `config.json` compare equal."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = json.loads(json.dumps(value, default=str))
    return out


# --- size presets -------------------------------------------------------------------------------
# Published totals: GPT-2 small 124M, GPT-3 175B (Brown et al. 2020, Table 2.1),
# LLaMA 7B / 65B (Touvron et al. 2023, Table 2).
_LLAMA = dict(family='llama', use_bias=False, tie_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: unit tests and smoke runs.
    'toy': dict(vocab_size=1024, n_layer=2, d_model=96, n_head=4, max_seq_len=128),
    'toy-llama': dict(vocab_size=1024, n_layer=2, d_model=128, n_head=8, n_kv_head=4,
                      max_seq_len=128, ffn_multiple_of=32, **_LLAMA),
    # The CPU default: the peer benchmark's shape (13.9M parameters with an 8192 vocab).
    'mini': dict(vocab_size=8192, n_layer=6, d_model=384, n_head=6, max_seq_len=256),
    'gpt2-124m': dict(vocab_size=50257, n_layer=12, d_model=768, n_head=12, max_seq_len=1024),
    'gpt2-350m': dict(vocab_size=50257, n_layer=24, d_model=1024, n_head=16, max_seq_len=1024),
    'gpt3-175b': dict(vocab_size=50257, n_layer=96, d_model=12288, n_head=96, max_seq_len=2048),
    'llama-7b': dict(vocab_size=32000, n_layer=32, d_model=4096, n_head=32, max_seq_len=2048,
                     norm_eps=1e-6, **_LLAMA),
    'llama-65b': dict(vocab_size=32000, n_layer=80, d_model=8192, n_head=64, max_seq_len=2048,
                      norm_eps=1e-6, **_LLAMA),
}
