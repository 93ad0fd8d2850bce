"""Checkpoints on other meshes, atomic saves: `python -m pytest -q tests/test_checkpoint.py`."""

import dataclasses
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from gptstack import model as gpt_model
from gptstack import stage
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import GPTConfig, OptimConfig
from gptstack.optim import make_optimizer
from gptstack.state import abstract_train_state, create_train_state, state_shardings
from gptstack.steps.lm import make_lm_step
from tests.test_lm_step import B, packed_batch

CONFIG = GPTConfig.preset('toy')


def model_fn(rngs):
    return gpt_model.GPT(CONFIG, rngs=rngs)


def test_save_on_fsdp8_restore_on_2x4_and_one_device(tmp_path, mesh_8, mesh_2x4, mesh_1):
    tx, schedule = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, total_steps=20))
    graphdef, state, shardings = create_train_state(model_fn, tx, mesh_8, 'fsdp',
                                                    jax.random.key(0))
    step = make_lm_step(graphdef, tx, schedule, mesh_8, 'fsdp', shardings, B)
    state, _ = step(state, packed_batch(0))
    checkpointer = Checkpointer(tmp_path / 'ckpt')
    checkpointer.save(1, state, meta={'note': 'fsdp8'})
    checkpointer.wait()
    saved = jax.device_get(nnx.to_pure_dict(state.params))
    _, expected = step(state, packed_batch(1))

    abstract = abstract_train_state(model_fn, tx)
    for mesh, rules in ((mesh_2x4, 'fsdp_tp'), (mesh_1, 'fsdp')):
        target_shardings = state_shardings(abstract, mesh, rules, tx)
        restored, meta = checkpointer.restore(1, abstract_with_shardings(abstract,
                                                                         target_shardings))
        assert meta == {'step': 1, 'note': 'fsdp8'}
        leaf = restored.params['transformer']['blocks']['attn']['q_weight_dnh'].get_value()
        assert leaf.sharding == target_shardings.params['transformer']['blocks']['attn'][
            'q_weight_dnh'].get_value()
        jax.tree.map(np.testing.assert_array_equal, saved,
                     jax.device_get(nnx.to_pure_dict(restored.params)))
        assert int(restored.step) == 1
        other_step = make_lm_step(graphdef, tx, schedule, mesh, rules, target_shardings, B)
        _, metrics = other_step(restored, packed_batch(1))
        np.testing.assert_allclose(metrics['loss'], expected['loss'], rtol=1e-6)
    checkpointer.close()


CRASH_SCRIPT = textwrap.dedent('''
    import os, sys
    import jax, jax.numpy as jnp
    from gptstack.checkpoint import Checkpointer
    checkpointer = Checkpointer(sys.argv[1])
    state = {'w': jnp.arange(10_000_000, dtype=jnp.float32)}
    checkpointer.save(1, state)
    checkpointer.wait()
    checkpointer.save(2, {'w': state['w'] + 1})
    os._exit(1)  # die while step 2 is still being written in the background
''')


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / 'ckpt'
    subprocess.run([sys.executable, '-c', CRASH_SCRIPT, str(directory)], check=False,
                   timeout=120)
    # The save of step 2 had started: its temporary directory is there, never renamed.
    assert [p.name for p in directory.iterdir() if p.name.startswith('2')] == [
        '2.orbax-checkpoint-tmp']
    checkpointer = Checkpointer(directory)
    assert checkpointer.latest_step() == 1
    abstract = {'w': jax.ShapeDtypeStruct((10_000_000,), np.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(
                                              jax.devices()[0]))}
    state, _ = checkpointer.restore(1, abstract)
    np.testing.assert_array_equal(state['w'], np.arange(10_000_000, dtype=np.float32))
    checkpointer.close()


@pytest.mark.parametrize('damage', ['state file cut short', 'meta garbled', 'state deleted'])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_restored(
        tmp_path, mesh_1, tokenizer, caplog, damage):
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, total_steps=20))
    _, state, shardings = create_train_state(model_fn, tx, mesh_1, 'fsdp', jax.random.key(0))
    meta = {'model': dataclasses.asdict(CONFIG), 'tokenizer_sha256': tokenizer.sha256}
    checkpointer = Checkpointer(tmp_path / 'ckpt', async_save=False)
    checkpointer.save(1, state, meta=meta)
    checkpointer.save(2, state.replace(step=state.step + 1), meta=meta)
    checkpointer.close()
    step_dir = tmp_path / 'ckpt' / '2'
    if damage == 'state file cut short':
        for path in (step_dir / 'state').rglob('*'):
            if path.is_file() and path.stat().st_size > 1000:
                path.write_bytes(path.read_bytes()[:100])
    elif damage == 'meta garbled':
        for path in (step_dir / 'meta').rglob('*'):
            if path.is_file():
                path.write_text('{"step": 2, "mod')
    else:
        shutil.rmtree(step_dir / 'state')

    checkpointer = Checkpointer(tmp_path / 'ckpt')
    restored, restored_meta = stage.resume(checkpointer, abstract_train_state(model_fn, tx),
                                           shardings, tokenizer, CONFIG, None)
    assert int(restored.step) == 0 and restored_meta['step'] == 1
    assert checkpointer.all_steps() == [1]
    assert (tmp_path / 'ckpt' / '2.damaged').is_dir() and not step_dir.exists()
    assert f'checkpoint {step_dir} cannot be read' in caplog.text
    assert f'moved to {tmp_path / "ckpt" / "2.damaged"}, trying the one before' in caplog.text
    checkpointer.close()
