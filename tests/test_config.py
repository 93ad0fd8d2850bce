"""Config validation and preset sizes: `python -m pytest -q tests/test_config.py`."""

import dataclasses
import re
import types

import jax
import pytest

from gptstack import model as gpt_model
from gptstack import sharding
from gptstack.config import PRESETS, ConfigError, GPTConfig, MeshConfig, OptimConfig
from gptstack.state import abstract_model


def n_params(preset: str) -> int:
    config = GPTConfig.preset(preset)
    _, params = abstract_model(lambda rngs: gpt_model.GPT(config, rngs=rngs))
    return gpt_model.count_params(params)


@pytest.mark.parametrize('preset, published', [
    ('gpt3-175b', 175e9),   # Brown et al. 2020, Table 2.1
    ('llama-65b', 65.2e9),  # Touvron et al. 2023, Table 2
    ('llama-7b', 6.7e9),
])
def test_reference_presets_match_published_sizes(preset, published):
    assert abs(n_params(preset) / published - 1) < 0.01


def test_gpt2_small_is_124m():
    assert round(n_params('gpt2-124m') / 1e6) == 124


def test_llama_ffn_width_follows_the_paper():
    assert GPTConfig.preset('llama-65b').d_ff == 22016
    assert GPTConfig.preset('llama-7b').d_ff == 11008
    assert GPTConfig.preset('gpt3-175b').d_ff == 4 * 12288


def test_matmul_dtype_defaults_to_the_compute_dtype():
    assert GPTConfig.preset('toy').matmul_dtype == 'float32'
    assert GPTConfig.preset('toy', dtype='bfloat16').matmul_dtype == 'bfloat16'
    mixed = GPTConfig.preset('toy', matmul_dtype='bfloat16')
    assert (mixed.dtype, mixed.matmul_dtype) == ('float32', 'bfloat16')


def test_every_preset_builds():
    for name in PRESETS:
        config = GPTConfig.preset(name)
        assert config.d_model % config.n_head == 0


@pytest.mark.parametrize('overrides, message', [
    (dict(n_head=5), 'GPTConfig.n_head=5 must divide d_model=96'),
    (dict(n_kv_head=3), 'GPTConfig.n_kv_head=3 must divide n_head=4'),
    (dict(family='bert'), "GPTConfig.family='bert': expected one of ('gpt', 'llama')"),
    (dict(n_layer=0), 'GPTConfig.n_layer=0: expected a positive integer'),
    (dict(dtype='float16'), "GPTConfig.dtype='float16': expected one of"),
    (dict(matmul_dtype='int8'), "GPTConfig.matmul_dtype='int8': expected one of"),
    (dict(d_model=100, n_head=4, family='llama'), 'RoPE needs an even head_dim'),
])
def test_bad_model_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GPTConfig.preset('toy', **overrides)


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"GPTConfig: unknown key\(s\) \['n_layers'\]"):
        GPTConfig.preset('toy', n_layers=3)
    with pytest.raises(ConfigError, match=r"OptimConfig: unknown key\(s\) \['lrr'\]"):
        OptimConfig.from_dict({'lrr': 1.0})
    with pytest.raises(ConfigError, match=r"model preset 'gpt5'"):
        GPTConfig.preset('gpt5')


def test_bad_optim_configs():
    with pytest.raises(ConfigError, match=r'OptimConfig\.warmup_steps=10'):
        OptimConfig(warmup_steps=10, total_steps=10)
    with pytest.raises(ConfigError, match=r'OptimConfig\.accum_steps=0'):
        OptimConfig(accum_steps=0)


def test_bad_mesh_configs():
    with pytest.raises(ConfigError, match=r'at most one axis may be -1'):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"MeshConfig\.rules='zero3'"):
        MeshConfig(rules='zero3')
    with pytest.raises(ConfigError, match=r'MeshConfig\.tensor=0'):
        MeshConfig(tensor=0)


def test_mesh_must_match_the_devices():
    with pytest.raises(ConfigError, match=r'data\*fsdp\*tensor = 2\*3\*1 = 6 does not match the 8'):
        sharding.make_mesh(MeshConfig(data=2, fsdp=3))
    with pytest.raises(ConfigError, match=r'multiply to 3, which does not divide the 8'):
        sharding.make_mesh(MeshConfig(data=3, fsdp=-1))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
    assert len(jax.devices()) == mesh.devices.size


def test_checkpoint_compatibility_ignores_compute_policy_and_fields_it_predates():
    from gptstack.stage import check_compatible
    tokenizer = types.SimpleNamespace(sha256='abc')
    current = GPTConfig.preset('toy', matmul_dtype='bfloat16', remat=True)
    saved = dataclasses.asdict(GPTConfig.preset('toy'))
    del saved['scan_layers']  # written before the field existed: it reads back as the default
    meta = {'tokenizer_sha256': 'abc', 'model': saved}
    check_compatible(meta, tokenizer, current, 'ckpt/7')
    with pytest.raises(ConfigError, match=re.escape(
            'ckpt/7 has a different model config: d_ff=768 there vs 384 here, '
            'd_model=192 there vs 96 here')):
        check_compatible({**meta, 'model': {**saved, 'd_model': 192, 'd_ff': None}},
                         tokenizer, current, 'ckpt/7')
    with pytest.raises(ConfigError, match='ckpt/7 was trained with tokenizer sha256 xyz'):
        check_compatible({**meta, 'tokenizer_sha256': 'xyz'}, tokenizer, current, 'ckpt/7')


def test_attention_is_cudnn_on_gpus_where_it_compiles_and_ours_elsewhere():
    from gptstack.environment import attention
    assert attention('cpu', 'bfloat16')[0] == attention('tpu', 'bfloat16')[0] == 'gptstack'
    assert attention('gpu', 'bfloat16', lambda dtype: None) == ('cudnn', 'cuDNN fused attention')
    assert attention('gpu', 'bfloat16', lambda dtype: 'no cuDNN') == (
        'xla', 'cuDNN attention is not available here: no cuDNN')
    assert attention('gpu', 'float32', lambda dtype: None) == (
        'xla', 'cuDNN attention takes bfloat16 or float16 inputs, not float32')
    # On this CPU, cuDNN does not compile: the probe says why instead of raising.
    from gptstack.environment import cudnn_attention_error
    assert cudnn_attention_error('bfloat16')


def test_auto_precision_is_the_fastest_policy_of_the_platform():
    from gptstack.environment import PRECISIONS, auto_precision, precision

    assert auto_precision('tpu', set()) == auto_precision('gpu', set()) == 'bfloat16'
    assert auto_precision('cpu', {'avx2', 'amx_bf16', 'amx_tile'}) == 'mixed'
    assert auto_precision('cpu', {'avx2', 'avx512f', 'avx512_bf16'}) == 'mixed'
    assert auto_precision('cpu', {'avx2', 'avx512f'}) == 'float32'
    assert precision('mixed', 'tpu') == ('mixed', PRECISIONS['mixed'])
    configs = {name: GPTConfig.preset('toy', **policy) for name, policy in PRECISIONS.items()}
    assert {name: (c.dtype, c.matmul_dtype) for name, c in configs.items()} == {
        'float32': ('float32', 'float32'), 'mixed': ('float32', 'bfloat16'),
        'bfloat16': ('bfloat16', 'bfloat16')}
