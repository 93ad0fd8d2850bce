"""How much of the RL stage's policy gradient is signal, at a policy, for each reward.

    python -m experiments.gradient_noise --policy=workdirs/pipeline/sft \
        --reward_from=workdirs/pipeline/reward [--batches=8] [--rollouts=256] [--out=noise.json]

Draws `--batches` disjoint batches of `--rollouts` replies (`--group_size` to each training
prompt of the embedded task suite, at temperature 1, as the RL stage samples them), scores them
with the gold scorer and, with `--reward_from`, the reward model, and for each reward measures
the cosine between the batches' policy gradients (group-centred, whitened advantages; the
actor's loss at ratio 1) and the noise scale: the batch at which signal and noise are equal
(`gptstack.evals.gradient_noise`). What the main job's SFT model gives is in docs/results.md.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging

from gptstack import environment
from gptstack.chat import reply_text
from gptstack.config import ConfigError
from gptstack.data import tasks
from gptstack.data.sources import DataError
from gptstack.data.tokenizer import render_prompt
from gptstack.evals import gold
from gptstack.evals.gradient_noise import group_advantages, make_policy_gradient, noise_scale
from gptstack.lineage import load_policy, load_reward_model
from gptstack.rollout import rollout_rows
from gptstack.sampling import SamplingParams

_POLICY = flags.DEFINE_string('policy', None, 'A policy workdir (SFT, RL, DPO) or hf:DIR.')
_REWARD_FROM = flags.DEFINE_string('reward_from', None, 'A reward-model workdir (optional).')
_BATCHES = flags.DEFINE_integer('batches', 8, 'Disjoint batches (at least 2).')
_ROLLOUTS = flags.DEFINE_integer('rollouts', 256, 'Replies per batch.')
_GROUP = flags.DEFINE_integer('group_size', 4, 'Replies per prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 48, 'Reply budget (the RL stage\'s).')
_SEED = flags.DEFINE_integer('seed', 0, 'Prompts and samples.')
_OUT = flags.DEFINE_string('out', '', 'Write the figures here as JSON.')
flags.mark_flag_as_required('policy')


def measure(policy, scorer, batches: int, rollouts: int, group_size: int, max_new_tokens: int,
            seed: int) -> dict:
    """`{reward: noise_scale(...)}` for the gold scorer and, with `scorer`, the reward model."""
    if batches < 2 or rollouts % group_size:
        raise ConfigError(f'--batches={batches} --rollouts={rollouts} --group_size='
                          f'{group_size}: need 2 or more batches of whole groups')
    tok = policy.tokenizer
    sampler = policy.sampler(rollouts, max_new_tokens)
    gradient = make_policy_gradient(policy.graphdef)
    drawn = tasks.generate('train', batches * rollouts // group_size, seed)
    max_prompt = policy.config.max_seq_len - max_new_tokens - 1
    grads, scores = {'gold': [], 'reward_model': []}, {'gold': [], 'reward_model': []}
    for b in range(batches):
        chunk = drawn[b * rollouts // group_size:(b + 1) * rollouts // group_size]
        conversations = [c for c in gold.conversations(chunk) for _ in range(group_size)]
        # As the RL stage keeps them: the end of each prompt, leaving room for the reply and
        # the reward token within the context.
        prompts = [render_prompt(tok, c)[-max_prompt:] for c in conversations]
        out = sampler(policy.params, prompts, jax.random.fold_in(jax.random.key(seed), b),
                      SamplingParams(temperature=1.0, top_k=0, top_p=1.0))
        lengths = out['lengths'].astype(np.int32)
        replies = [reply_text(tok, row[:n]) for row, n in zip(out['tokens'], lengths,
                                                               strict=True)]
        rewards = {'gold': gold.score(chunk, [replies[i:i + group_size] for i in
                                              range(0, rollouts, group_size)]).reshape(-1)}
        if scorer is not None:
            rewards['reward_model'] = scorer(
                conversations, [[{'role': 'assistant', 'content': r}] for r in replies])
        rows = rollout_rows(prompts, out['tokens'], lengths, sampler, tok.reward_id)
        for name, reward in rewards.items():
            scores[name].append(float(np.mean(reward)))
            grads[name].append(np.asarray(gradient(policy.params, rows,
                                                   group_advantages(reward, group_size))))
        logging.info('batch %d of %d: %s', b + 1, batches,
                     ', '.join(f'{k} {np.mean(v):.3f}' for k, v in rewards.items()))
    return {name: {**noise_scale(g, rollouts), 'mean_reward': float(np.mean(scores[name]))}
            for name, g in grads.items() if g}


def main(argv) -> int:
    del argv
    environment.start_tool()
    try:
        policy = load_policy(_POLICY.value)
        scorer = load_reward_model(_REWARD_FROM.value).scorer(64) if _REWARD_FROM.value \
            else None
        result = measure(policy, scorer, _BATCHES.value, _ROLLOUTS.value, _GROUP.value,
                         _MAX_NEW.value, _SEED.value)
    except (ConfigError, DataError) as error:
        logging.error('%s', error)
        return 1
    for name, r in result.items():
        print(f'{name}: cosine {r["cosine"]:.3f} ± {r["cosine_stderr"]:.3f} at {r["batch"]} '
              f'rollouts, noise scale {r["noise_scale"] and round(r["noise_scale"])} rollouts')
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(app.run(main))
