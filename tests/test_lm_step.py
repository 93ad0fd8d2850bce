"""The jitted language-model step: mesh equivalence, accumulation, learning.

Run: `python -m pytest -q tests/test_lm_step.py`.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from gptstack import model as gpt_model
from gptstack.config import GPTConfig, OptimConfig
from gptstack.optim import make_optimizer
from gptstack.state import create_train_state
from gptstack.steps.lm import make_lm_step

B, T = 8, 32


def packed_batch(seed=0, vocab=1024):
    """Two documents per row with restarting positions; the last target of each is masked."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(B, T + 1)).astype(np.int32)
    cut = rng.integers(4, T - 4, size=B)
    idx = np.arange(T)
    segment_ids = np.where(idx[None] < cut[:, None], 1, 2).astype(np.int32)
    positions = np.where(idx[None] < cut[:, None], idx[None], idx[None] - cut[:, None])
    loss_mask = (np.roll(segment_ids, -1, axis=1) == segment_ids).astype(np.int32)
    loss_mask[:, -1] = 1
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids,
                positions=positions.astype(np.int32), loss_mask=loss_mask)


def run_steps(preset, mesh, rules, tx, schedule, n_steps=1, accum_steps=1, batch=None,
              **overrides):
    """Creates the state on `mesh` and runs `n_steps` on one batch.

    Returns `(initial params, final state, per-step metrics)`.
    """
    config = GPTConfig.preset(preset, **overrides)
    graphdef, state, shardings = create_train_state(
        lambda rngs: gpt_model.GPT(config, rngs=rngs), tx, mesh, rules, jax.random.key(0))
    params0 = jax.device_get(nnx.to_pure_dict(state.params))
    step = make_lm_step(graphdef, tx, schedule, mesh, rules, shardings, B, accum_steps)
    batch = packed_batch() if batch is None else batch
    history = []
    for _ in range(n_steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return params0, state, history


def sgd():
    # With plain SGD at lr=1 the update is exactly minus the gradient: the step exposes it.
    return optax.sgd(1.0), lambda step: 1.0


@pytest.mark.parametrize('preset', ['toy', 'toy-llama'])
def test_same_loss_and_gradients_on_every_mesh(preset, mesh_1, mesh_2x4, mesh_8):
    results = {}
    for name, mesh, rules in (('1', mesh_1, 'fsdp'), ('2x4', mesh_2x4, 'fsdp_tp'),
                              ('fsdp8', mesh_8, 'fsdp')):
        params0, state, history = run_steps(preset, mesh, rules, *sgd())
        grads = jax.tree.map(lambda a, b: a - b, params0,
                             jax.device_get(nnx.to_pure_dict(state.params)))
        results[name] = (history[0], grads)
        # The step's outputs keep the shardings they came in with.
        leaf = state.params['transformer']['blocks']['mlp']['up_weight_df'].get_value()
        assert leaf.sharding.mesh.shape == mesh.shape
    ref_metrics, ref_grads = results['1']
    assert np.isfinite(ref_metrics['loss']) and ref_metrics['tokens'] == B * T - B
    for name in ('2x4', 'fsdp8'):
        metrics, grads = results[name]
        np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-6)
        np.testing.assert_allclose(metrics['grad_norm'], ref_metrics['grad_norm'], rtol=1e-5)
        # Gradients recovered as params0 - params1 carry the rounding of params near 1.0 (the
        # norm scales): one float32 ulp there is 1.2e-7.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-7),
                     grads, ref_grads)


@pytest.mark.parametrize('preset', ['toy', 'toy-llama'])
def test_bfloat16_matmuls_track_float32(preset, mesh_1):
    """The mixed policy (bf16 matmul inputs, f32 accumulation, in both passes) against float32:
    the gradients agree to bf16 precision, and the losses of ten Adam steps to 1%."""
    runs = {}
    for name, policy in (('float32', {}), ('mixed', {'matmul_dtype': 'bfloat16'})):
        params0, state, _ = run_steps(preset, mesh_1, 'fsdp', *sgd(), **policy)
        grads = jax.tree.map(lambda a, b: a - b, params0,
                             jax.device_get(nnx.to_pure_dict(state.params)))
        tx, schedule = make_optimizer(OptimConfig(lr=3e-3, total_steps=10, warmup_steps=1))
        _, _, history = run_steps(preset, mesh_1, 'fsdp', tx, schedule, n_steps=10, **policy)
        runs[name] = grads, np.array([m['loss'] for m in history])
    (grads32, losses32), (grads16, losses16) = runs['float32'], runs['mixed']
    flat32, flat16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
    error = max(float(np.abs(a - b).max()) for a, b in zip(flat32, flat16, strict=True))
    scale = max(float(np.abs(a).max()) for a in flat32)
    assert error < 0.03 * scale, (error, scale)
    assert losses32[-1] < losses32[0] - 0.1  # it learns, so the comparison means something
    np.testing.assert_allclose(losses16, losses32, rtol=0.01)
    assert not np.array_equal(losses16, losses32)  # the policy is really in effect


def test_micro_batches_must_split_over_the_mesh(mesh_8):
    # accum_steps=2 halves the micro-batch to 4 rows, which no longer splits over 8 devices.
    with pytest.raises(ValueError, match='batch size 4 is not divisible by the 8 batch shards'):
        run_steps('toy', mesh_8, 'fsdp', *sgd(), accum_steps=2)


def test_gradient_accumulation_equals_one_big_batch(mesh_2x4):
    tx, schedule = sgd()
    _, one, h1 = run_steps('toy', mesh_2x4, 'fsdp_tp', tx, schedule, accum_steps=1)
    _, four, h4 = run_steps('toy', mesh_2x4, 'fsdp_tp', tx, schedule, accum_steps=4)
    np.testing.assert_allclose(h4[0]['loss'], h1[0]['loss'], rtol=1e-6)
    assert h4[0]['tokens'] == h1[0]['tokens']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 jax.device_get(nnx.to_pure_dict(four.params)),
                 jax.device_get(nnx.to_pure_dict(one.params)))


@pytest.mark.parametrize('preset', ['toy', 'toy-llama'])
def test_loss_falls_on_a_repeating_pattern(preset, mesh_8):
    pattern = np.tile(np.arange(7, dtype=np.int32) * 13 % 97, B * (T + 1) // 7 + 1)
    tokens = pattern[:B * (T + 1)].reshape(B, T + 1)
    ones = np.ones((B, T), np.int32)
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=ones,
                 positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
                 loss_mask=ones)
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=5, total_steps=40))
    _, _, history = run_steps(preset, mesh_8, 'fsdp', tx, schedule, n_steps=40, batch=batch)
    losses = [h['loss'] for h in history]
    assert losses[0] > 6.0  # about log(1024) at initialisation
    assert losses[-1] < 0.5, losses
    assert history[-1]['lr'] < history[10]['lr']  # the cosine decays
