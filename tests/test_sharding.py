"""Shardings follow the logical axis names: `python -m pytest -q tests/test_sharding.py`.

The golden table `tests/golden/partition_specs.json` snapshots every parameter's PartitionSpec
per rules preset; regenerate it on purpose with
`GPTSTACK_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py`.
"""

import json
import os
import pathlib

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptstack import model as gpt_model
from gptstack import sharding
from gptstack.config import GPTConfig, OptimConfig
from gptstack.optim import make_optimizer
from gptstack.state import abstract_model, create_train_state

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'partition_specs.json'


def test_logical_to_spec_skips_mesh_axes_already_used():
    assert sharding.logical_to_spec(('batch', 'seq', 'embed'), 'fsdp') == P(('data', 'fsdp'),
                                                                            None, None)
    assert sharding.logical_to_spec(('embed', 'mlp'), 'fsdp') == P('fsdp', None)
    assert sharding.logical_to_spec(('embed', 'mlp'), 'fsdp_tp') == P('fsdp', 'tensor')
    assert sharding.logical_to_spec(('layers', 'embed', 'heads', 'head_dim'),
                                    'fsdp_tp') == P(None, 'fsdp', 'tensor', None)
    assert sharding.logical_to_spec(('vocab', 'embed'), 'dp') == P(None, None)


def spec_table(preset: str, rules: str) -> dict[str, str]:
    config = GPTConfig.preset(preset)
    _, params = abstract_model(lambda rngs: gpt_model.GPT(config, rngs=rngs))
    table = {}
    for path, variable in nnx.to_flat_state(params):
        names = variable.get_metadata()['out_sharding']
        table['/'.join(map(str, path))] = str(sharding.logical_to_spec(names, rules))
    return table


def test_partition_specs_match_the_golden_table():
    current = {rules: {preset: spec_table(preset, rules) for preset in ('gpt2-124m', 'llama-7b')}
               for rules in sharding.RULES}
    if os.environ.get('GPTSTACK_UPDATE_GOLDEN'):
        GOLDEN.write_text(json.dumps(current, indent=1, sort_keys=True) + '\n')
    assert current == json.loads(GOLDEN.read_text())


@pytest.mark.parametrize('preset', ['toy', 'toy-llama'])
def test_every_param_and_optimizer_leaf_is_born_sharded(preset, mesh_2x4):
    config = GPTConfig.preset(preset)
    tx, _ = make_optimizer(OptimConfig(total_steps=10, warmup_steps=1))
    _, state, _ = create_train_state(lambda rngs: gpt_model.GPT(config, rngs=rngs), tx,
                                     mesh_2x4, 'fsdp_tp', jax.random.key(0))
    adam = state.opt_state[1][0]  # chain(clip, adamw(scale_by_adam, ...)) -> ScaleByAdamState
    assert isinstance(adam, optax.ScaleByAdamState)
    checked = 0
    for tree in (state.params, adam.mu, adam.nu):
        for path, variable in nnx.to_flat_state(tree):
            names = variable.get_metadata()['out_sharding']
            expected = NamedSharding(mesh_2x4, sharding.logical_to_spec(names, 'fsdp_tp'))
            array = variable.get_value()
            assert array.sharding.is_equivalent_to(expected, array.ndim), (path, array.sharding)
            checked += 1
    assert checked == 3 * len(nnx.to_flat_state(state.params))
    # Something really is split: the embedding table is stored in 8 pieces.
    table = state.params['transformer']['token_embed_vd'].get_value()
    assert table.addressable_shards[0].data.shape == (1024 // 4, config.d_model // 2)
    assert state.step.sharding.is_fully_replicated


def test_parameter_that_does_not_divide_its_mesh_axis_is_an_error(mesh_2x4):
    config = GPTConfig.preset('toy', n_head=6)  # 6 heads cannot split over tensor=4
    tx, _ = make_optimizer(OptimConfig(total_steps=10, warmup_steps=1))
    with pytest.raises(ValueError, match=r"\['attn'\]\['\w+'\] has (kv_)?heads=6, which mesh "
                                         r'axes tensor of total size 4 do not divide'):
        create_train_state(lambda rngs: gpt_model.GPT(config, rngs=rngs), tx, mesh_2x4,
                           'fsdp_tp', jax.random.key(0))


def test_batch_must_divide_the_batch_shards(mesh_8):
    with pytest.raises(ValueError, match='batch size 12 is not divisible by the 8 batch shards'):
        sharding.batch_sharding(mesh_8, 'fsdp', 12)


def test_round_to_batch_shards(mesh_8, mesh_2x4, mesh_1):
    assert [sharding.round_to_batch_shards(mesh_8, n) for n in (1, 8, 9, 12)] == [8, 8, 16, 16]
    assert [sharding.round_to_batch_shards(mesh_2x4, n) for n in (1, 3, 4)] == [2, 4, 4]
    assert sharding.round_to_batch_shards(mesh_1, 3) == 3
