"""The gradient-noise measurement: the cosine of batch gradients recovers a known signal share
and noise scale, the policy gradient raises the log-probability of a reply with a positive
advantage, and the command measures the quick pipeline's SFT model."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gptstack.evals.gradient_noise import group_advantages, make_policy_gradient, noise_scale

from .runs import ROOT


def test_noise_scale_recovers_the_signal_share_of_known_gradients():
    rng = np.random.default_rng(0)
    dim, batch = 200_000, 64
    signal = rng.normal(size=dim)
    signal /= np.linalg.norm(signal)
    # Noise of squared norm 9 per batch: the signal's share is 1 / (1 + 9) = 0.1 and the
    # noise scale 64 * 9 = 576 rollouts.
    grads = [signal + 3 * rng.normal(size=dim) / np.sqrt(dim) for _ in range(8)]
    result = noise_scale(grads, batch)
    assert result['cosine'] == pytest.approx(0.1, abs=0.01)
    assert result['noise_scale'] == pytest.approx(576, rel=0.1)
    assert result['signal_share'][batch * 16] == pytest.approx(16 / (16 + 9), abs=0.02)
    assert noise_scale([signal, -signal], batch)['noise_scale'] is None  # no signal measured
    tied = noise_scale([signal, np.zeros(dim)], batch)  # every group of a batch tied
    assert tied['cosine'] == 0 and tied['noise_scale'] is None


def test_group_advantages_are_centred_within_groups_and_whitened():
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(scores, 4)
    np.testing.assert_allclose(adv.reshape(2, 4).mean(1), 0, atol=1e-7)
    np.testing.assert_allclose(adv[4:], 0)  # a tied group carries nothing
    assert adv.std() == pytest.approx(1, rel=1e-4)


def test_descending_the_policy_gradient_raises_the_rewarded_reply(mesh_1):
    from flax import nnx

    from gptstack.config import GPTConfig
    from gptstack.model import GPT
    from gptstack.rollout import rollout_batch
    from gptstack.steps import ppo
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(GPT(GPTConfig.preset('toy'), rngs=nnx.Rngs(0)))
    prompts = [[1, 5, 9], [1, 5, 9]]
    responses = np.array([[7, 8, 2], [3, 4, 2]], np.int32)
    rows = rollout_batch(prompts, responses, np.array([3, 3], np.int32), 4, 0, 1023)
    grad = make_policy_gradient(graphdef)(params, rows, jnp.array([1.0, -1.0]))
    flat, unravel = ravel_pytree(params)
    stepped = unravel(flat - 1e-2 * grad / jnp.linalg.norm(grad))

    def logp(p):
        return np.asarray(ppo.response_log_probs(graphdef, p, rows)[0].sum(axis=1))

    before, after = logp(params), logp(stepped)
    assert after[0] > before[0] and after[1] < before[1]


def test_the_command_measures_a_policy_and_its_reward_model(sft_workdir, reward_workdir,
                                                            tmp_path):
    out = tmp_path / 'noise.json'
    result = subprocess.run(
        [sys.executable, '-m', 'experiments.gradient_noise', f'--policy={sft_workdir}',
         f'--reward_from={reward_workdir}', '--batches=2', '--rollouts=16', '--group_size=4',
         '--max_new_tokens=8', f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures) == {'gold', 'reward_model'}
    for r in figures.values():
        assert r['batches'] == 2 and r['batch'] == 16 and -1 <= r['cosine'] <= 1
        assert r['gradient_norm'] >= 0
