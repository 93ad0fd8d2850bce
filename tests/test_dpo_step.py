"""The DPO step on a toy GPT: the same step on every mesh and with accumulation, and its loss,
NLL term and accuracy against a direct computation. Run: `python -m pytest -q
tests/test_dpo_step.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptstack import losses
from gptstack.config import GPTConfig
from gptstack.data.preference import to_model_batch
from gptstack.model import GPT
from gptstack.state import create_train_state
from gptstack.steps import dpo

LOSS = dpo.DPOLoss(beta=0.5, nll_coef=0.7)
REWARD, PAD = 1000, 1001
B, K, T = 8, 3, 16


def ranked_batch(seed):
    """Padded groups of K completions of random length; the true rank is how many 7s they hold,
    with some ties and an empty slot."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, K, T), PAD, np.int32)
    lengths = rng.integers(5, T, size=(B, K))
    sevens = rng.integers(0, 3, size=(B, K))
    for b in range(B):
        for k in range(K):
            body = rng.integers(8, 900, size=lengths[b, k] - 1)
            body[rng.choice(len(body), sevens[b, k], replace=False)] = 7
            tokens[b, k, :lengths[b, k]] = [*body, REWARD]
    valid = np.ones((B, K), np.int32)
    valid[0, 2] = 0
    tokens[0, 2] = PAD  # an empty slot, as the data pipeline leaves it
    return to_model_batch({'tokens': tokens, 'lengths': np.where(valid, lengths, 0),
                           'ranks': (3 - sevens).astype(np.int32), 'valid': valid})


def dpo_batch(seed):
    """Ranked padded groups, each completion's last half its reply, with made-up reference
    log-probabilities."""
    batch = dict(ranked_batch(seed))
    lengths = batch['segment_ids'].sum(axis=2)
    t = np.arange(batch['tokens'].shape[2])
    batch['reply_mask'] = ((t >= lengths[..., None] // 2)
                           & (t < lengths[..., None] - 1)).astype(np.int32)
    batch['ref_logp'] = np.random.default_rng(seed).normal(-40, 2, size=(B, K)).astype(
        np.float32)
    return batch


def step_once(mesh, rules, accum_steps):
    tx = optax.sgd(1.0)
    graphdef, state, shardings = create_train_state(
        lambda rngs: GPT(GPTConfig.preset('toy'), rngs=rngs), tx, mesh, rules,
        jax.random.key(0))
    params = jax.device_get(nnx.to_pure_dict(state.params))
    step = dpo.make_dpo_step(graphdef, tx, lambda s: 1.0, mesh, rules, shardings, B, LOSS,
                             accum_steps=accum_steps)
    state, metrics = step(state, dpo_batch(0))
    return graphdef, params, jax.device_get(metrics), jax.device_get(
        nnx.to_pure_dict(state.params))


def test_same_dpo_step_on_every_mesh_with_its_loss_and_nll_computed_directly(mesh_1, mesh_2x4):
    runs = [step_once(mesh, rules, accum) for mesh, rules, accum in
            ((mesh_1, 'fsdp', 1), (mesh_2x4, 'fsdp_tp', 1), (mesh_1, 'fsdp', 2))]
    graphdef, params, reference, updated = runs[0]
    for _, _, metrics, after in runs[1:]:
        for key in ('loss', 'nll', 'accuracy', 'margin', 'chosen_logp', 'grad_norm'):
            np.testing.assert_allclose(metrics[key], reference[key], rtol=2e-5, err_msg=key)
        for leaf, ref in zip(jax.tree.leaves(after), jax.tree.leaves(updated), strict=True):
            np.testing.assert_allclose(leaf, ref, rtol=1e-4, atol=1e-6)
    # The metrics from the model's log-probabilities, computed here group by group.
    batch = dpo_batch(0)
    state = nnx.State(jax.tree.map(jnp.asarray, params))
    logp = np.asarray(dpo.completion_log_probs(graphdef, state, batch), np.float64)
    pairs = np.asarray(losses.preference_pairs(batch['ranks'], batch['valid']))
    preference, nll, groups = 0.0, 0.0, 0
    for b in range(B):
        if not pairs[b].any():
            continue
        rewards = logp[b] - batch['ref_logp'][b]
        ordered = np.argwhere(pairs[b] > 0)
        preference += np.mean([np.logaddexp(0, -LOSS.beta * (rewards[i] - rewards[j]))
                               for i, j in ordered])
        valid = batch['valid'][b] > 0
        best = valid & (batch['ranks'][b] == batch['ranks'][b][valid].min())
        tokens = batch['reply_mask'][b, :, 1:].sum(axis=1)
        nll += -logp[b][best].sum() / tokens[best].sum()
        groups += 1
    np.testing.assert_allclose(reference['loss'], preference / groups, rtol=1e-5)
    np.testing.assert_allclose(reference['nll'], nll / groups, rtol=1e-5)
    assert reference['groups'] == groups and reference['nonfinite'] == 0
