"""Hugging Face `config.json` and `GPTConfig`, both ways: the fields of GPT-2 and of the LLaMA
architecture (LLaMA, Qwen2) mapped onto the model's own, and every field that the model does not
implement refused with a one-line `ConfigError` naming it (`gptstack.hf` loads the tensors)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

from gptstack.config import ConfigError, GPTConfig
from gptstack.data.sources import DataError

CONFIG_FILE = 'config.json'
ARCHITECTURES = {'GPT2LMHeadModel': 'gpt2', 'LlamaForCausalLM': 'llama',
                 'Qwen2ForCausalLM': 'qwen2'}


def read_config(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f'{path}: missing (a Hugging Face model directory has one)') from None
    except json.JSONDecodeError as error:
        raise DataError(f'{path}: not JSON ({error})') from None


# --- config.json <-> GPTConfig ------------------------------------------------------------------
def _field(hf: dict, where: str, name: str, expected: str, ok: Callable[[object], bool],
           default=None):
    value = hf.get(name, default)
    if not ok(value):
        raise ConfigError(f'{where}: {name}={value!r} is not supported (expected {expected})')
    return value


def architecture(hf: dict, where: str) -> str:
    """`'gpt2'`, `'llama'` or `'qwen2'` from `config.json`'s `architectures`."""
    names = hf.get('architectures') or []
    known = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if len(names) != 1 or not known:
        raise ConfigError(f'{where}: architectures={names!r} is not supported (expected one of '
                          f'{sorted(ARCHITECTURES)})')
    return known[0]


def _rope_theta(hf: dict, where: str) -> float:
    """RoPE's base, from transformers 5's `rope_parameters` or the older `rope_theta` and
    `rope_scaling` fields; only unscaled RoPE is implemented."""
    params = hf.get('rope_parameters') or {}
    scaling = hf.get('rope_scaling') or {}
    kind = params.get('rope_type') or scaling.get('rope_type') or scaling.get('type') \
        or 'default'
    if kind != 'default':
        raise ConfigError(f'{where}: rope type {kind!r} is not supported (expected unscaled '
                          'RoPE, rope_type "default")')
    return float(params.get('rope_theta', hf.get('rope_theta', 10_000.0)))


def gpt_config(hf: dict, where: str = CONFIG_FILE, **overrides) -> GPTConfig:
    """The `GPTConfig` of a Hugging Face `config.json` (as a dict); `overrides` set the
    computing fields (`param_dtype`, `dtype`, `matmul_dtype`, `remat`, `scan_layers`).

    Raises:
        ConfigError: for an architecture or a field value the model does not implement.
    """
    kind = architecture(hf, where)
    is_int = lambda v: isinstance(v, int) and v > 0  # noqa: E731
    if kind == 'gpt2':
        d = _field(hf, where, 'n_embd', 'a positive integer', is_int)
        _field(hf, where, 'activation_function', '"gelu_new" (GELU, tanh approximation)',
               lambda v: v in ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new')
        _field(hf, where, 'scale_attn_weights', 'true', lambda v: v is True, True)
        _field(hf, where, 'scale_attn_by_inverse_layer_idx', 'false', lambda v: v is False,
               False)
        _field(hf, where, 'add_cross_attention', 'false', lambda v: v is False, False)
        return GPTConfig(
            vocab_size=_field(hf, where, 'vocab_size', 'a positive integer', is_int),
            n_layer=_field(hf, where, 'n_layer', 'a positive integer', is_int),
            d_model=d,
            n_head=_field(hf, where, 'n_head', 'a positive integer', is_int),
            max_seq_len=_field(hf, where, 'n_positions', 'a positive integer', is_int),
            family='gpt',
            d_ff=_field(hf, where, 'n_inner', 'null or a positive integer',
                        lambda v: v is None or is_int(v)) or 4 * d,
            use_bias=True,
            tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
            norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
            **overrides)
    d = _field(hf, where, 'hidden_size', 'a positive integer', is_int)
    n_head = _field(hf, where, 'num_attention_heads', 'a positive integer', is_int)
    _field(hf, where, 'head_dim', f'null or hidden_size / num_attention_heads = {d // n_head}',
           lambda v: v is None or v == d // n_head)
    _field(hf, where, 'hidden_act', '"silu" (SwiGLU)', lambda v: v == 'silu', 'silu')
    _field(hf, where, 'mlp_bias', 'false', lambda v: v is False, False)
    if kind == 'llama':
        _field(hf, where, 'attention_bias', 'false', lambda v: v is False, False)
    else:
        _field(hf, where, 'use_sliding_window', 'false', lambda v: v is False, False)
        _field(hf, where, 'layer_types', 'full attention in every layer',
               lambda v: v is None or all(t == 'full_attention' for t in v))
    return GPTConfig(
        vocab_size=_field(hf, where, 'vocab_size', 'a positive integer', is_int),
        n_layer=_field(hf, where, 'num_hidden_layers', 'a positive integer', is_int),
        d_model=d,
        n_head=n_head,
        n_kv_head=_field(hf, where, 'num_key_value_heads', 'a positive integer', is_int, n_head),
        max_seq_len=_field(hf, where, 'max_position_embeddings', 'a positive integer', is_int),
        family='llama',
        d_ff=_field(hf, where, 'intermediate_size', 'a positive integer', is_int),
        use_bias=False,
        qkv_bias=kind == 'qwen2',
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        rope_theta=_rope_theta(hf, where),
        **overrides)


def hf_config(config: GPTConfig, **tokens) -> dict:
    """The `config.json` of `config` (`tokens`: `bos_token_id`, `eos_token_id`, ...).

    Raises:
        ConfigError: for a config no supported architecture expresses.
    """
    c = config
    if c.smeared_keys:
        raise ConfigError('GPTConfig.smeared_keys=True: no Hugging Face architecture smears its '
                          'keys')
    if c.family == 'gpt':
        if not c.use_bias:
            raise ConfigError('GPTConfig.use_bias=False: GPT2LMHeadModel has biases everywhere')
        return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
                'vocab_size': c.vocab_size, 'n_layer': c.n_layer, 'n_embd': c.d_model,
                'n_head': c.n_head, 'n_positions': c.max_seq_len, 'n_inner': c.d_ff,
                'activation_function': 'gelu_new', 'layer_norm_epsilon': c.norm_eps,
                'tie_word_embeddings': c.tie_embeddings, 'dtype': c.param_dtype, **tokens}
    if c.use_bias:
        raise ConfigError('GPTConfig.use_bias=True: the LLaMA layout exports without biases '
                          'beyond q/k/v (qkv_bias)')
    return {'architectures': ['Qwen2ForCausalLM' if c.qkv_bias else 'LlamaForCausalLM'],
            'model_type': 'qwen2' if c.qkv_bias else 'llama',
            'vocab_size': c.vocab_size, 'num_hidden_layers': c.n_layer,
            'hidden_size': c.d_model, 'num_attention_heads': c.n_head,
            'num_key_value_heads': c.n_kv_head, 'head_dim': c.head_dim,
            'intermediate_size': c.d_ff, 'max_position_embeddings': c.max_seq_len,
            'hidden_act': 'silu', 'rms_norm_eps': c.norm_eps,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': c.rope_theta},
            'tie_word_embeddings': c.tie_embeddings,
            **({} if c.qkv_bias else {'attention_bias': False, 'mlp_bias': False}),
            'dtype': c.param_dtype, **tokens}
