"""Replies to many task prompts, drawn the way evaluation, the labeler, best-of-N and the
comparison draw them (`gptstack.sampling.sample_many`: waves of growing budgets, batches sorted
by length), against one sampler call per batch of the same prompts with the same per-reply keys.

    python -m benchmarks.sample_many --workdir=workdirs/pipeline/sft [--prompts 1024] \
        [--batch_size 64] [--max_new_tokens 48] [--temperatures 1.5,1,0] [--out sample_many.json]

The policy of a finetuned workdir answers `--prompts` held-out task prompts in the chat template
(the labeler's batch and budget by default). Per temperature: seconds and replies per second of
both ways (each timed after a round that compiles its programs), the mean and longest reply,
and how many replies came out token for token the same (rounding can tell a prefilled
continuation from a decoded one in bfloat16).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptstack import environment
from gptstack.data import tasks
from gptstack.data.tokenizer import render_prompt
from gptstack.evals.gold import conversations
from gptstack.lineage import load_policy
from gptstack.sampling import SamplingParams, sample_many


def one_call_per_batch(sampler, params, prompts, keys, sampling) -> list[np.ndarray]:
    """Each batch decoded whole: until its longest reply stops."""
    replies = []
    for start in range(0, len(prompts), sampler.batch_size):
        out = sampler(params, prompts[start:start + sampler.batch_size],
                      keys[start:start + sampler.batch_size], sampling)
        replies += [row[:n] for row, n in zip(out['tokens'], out['lengths'], strict=True)]
    return replies


def timed(draw, *args) -> tuple[float, list[np.ndarray]]:
    draw(*args)  # compiles
    start = time.perf_counter()
    replies = draw(*args)
    return time.perf_counter() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', required=True, help='A finetuned workdir (SFT or later).')
    parser.add_argument('--prompts', type=int, default=1024)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--max_new_tokens', type=int, default=48)
    parser.add_argument('--temperatures', default='1.5,1,0')
    parser.add_argument('--out', default=None, help='Also write the results to this JSON.')
    args = parser.parse_args()
    environment.start_tool()
    policy = load_policy(args.workdir)
    sampler = policy.sampler(args.batch_size, args.max_new_tokens, chat=True)
    prompts = [render_prompt(policy.tokenizer, c)
               for c in conversations(tasks.generate('test', args.prompts, 0))]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0),
                                                           jnp.arange(len(prompts)))
    results = []
    for temperature in map(float, args.temperatures.split(',')):
        sampling = SamplingParams(temperature)
        whole, expected = timed(one_call_per_batch, sampler, policy.params, prompts, keys,
                                sampling)
        waves, replies = timed(sample_many, sampler, policy.params, prompts, keys, sampling)
        lengths = [len(r) for r in replies]
        row = {'temperature': temperature, 'prompts': len(prompts),
               'one_call_per_batch_s': whole, 'sample_many_s': waves, 'speedup': whole / waves,
               'replies_per_s': len(prompts) / waves, 'mean_reply_tokens': float(np.mean(lengths)),
               'longest_reply_tokens': max(lengths),
               'identical_replies': sum(np.array_equal(a, b)
                                        for a, b in zip(expected, replies, strict=True))}
        results.append(row)
        print(f'temperature {temperature:g}: one call per batch {whole:.2f} s, sample_many '
              f'{waves:.2f} s ({row["speedup"]:.2f}x, {row["replies_per_s"]:.0f} replies/s); '
              f'replies of {row["mean_reply_tokens"]:.1f} tokens on average, '
              f'{row["longest_reply_tokens"]} at most; {row["identical_replies"]} of '
              f'{len(prompts)} the same token for token', flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'workdir': args.workdir, 'batch_size': sampler.batch_size,
                       'max_new_tokens': args.max_new_tokens, 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
