"""Rank completions in the terminal: the human labeler's side of reward modelling.

    python -m experiments.rank --workdir=workdirs/sft --prompts=prompts.jsonl \
        --out=comparisons.jsonl [--num_completions=4] [--temperature=1.0]

    python -m experiments.rank --workdir=workdirs/sft --prompt='Write a haiku.' --out=c.jsonl

For each prompt (JSONL records `{prompt}` or `{messages}`, or `--prompt` flags) the model of
`--workdir` samples `--num_completions` replies; you type the rank of each reply, 1 for the best,
equal ranks for a tie (`1 3 2 2`), `s` to skip the prompt or `q` to stop. Each ranked prompt is
appended to `--out` as a K-way record `{prompt, completions, ranking}`, the layout the reward
stage reads (`--config.data.train=comparisons.jsonl`).
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

import jax
from absl import app, flags

from gptstack import environment
from gptstack.chat import sample_replies
from gptstack.config import ConfigError
from gptstack.data import preference
from gptstack.data.sources import DataError, SkipBudget, read_json_records
from gptstack.lineage import load_policy
from gptstack.sampling import SamplingParams

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finetuned (SFT or later) workdir.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'JSONL of {prompt} or {messages} records.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeatable).')
_OUT = flags.DEFINE_string('out', None, 'JSONL file the ranked comparisons are appended to.')
_K = flags.DEFINE_integer('num_completions', 4, 'Replies to rank per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Generation budget per reply.')
_SEED = flags.DEFINE_integer('seed', 0, 'Same seed, same replies.')
flags.mark_flags_as_required(['workdir', 'out'])


def parse_ranking(text: str, replies: list[str]) -> list[int]:
    """The ranks typed for `replies` (`'1 3 2 2'` or `'1,3,2,2'`), checked as the comparison
    reader checks them: one rank from 1 to K per reply, not all equal, identical replies tied.

    Raises:
        ValueError: saying what is expected.
    """
    k = len(replies)
    parts = text.replace(',', ' ').split()
    if len(parts) != k or not all(p.isdigit() and 1 <= int(p) <= k for p in parts):
        raise ValueError(f'expected {k} ranks, one per reply, each a whole number from 1 to {k} '
                         f'(1 is best, equal ranks tie), e.g. {" ".join(["1"] + ["2"] * (k - 1))}')
    ranks = [int(p) for p in parts]
    if len(set(ranks)) == 1:
        raise ValueError('all replies have the same rank: nothing to learn; type s to skip')
    for i, j in itertools.combinations(range(k), 2):
        if replies[i] == replies[j] and ranks[i] != ranks[j]:
            raise ValueError(f'replies {i + 1} and {j + 1} are identical: give them the same rank')
    return ranks


def read_prompts() -> list[list[dict]]:
    prompts = [[{'role': 'user', 'content': p}] for p in _PROMPT.value]
    if _PROMPTS.value:
        for where, record in read_json_records(pathlib.Path(_PROMPTS.value), SkipBudget()):
            if 'messages' in record:
                messages = preference.prompt_messages(record['messages'], where)
            elif 'prompt' in record:
                messages = preference.prompt_messages(record['prompt'], where)
            else:
                raise DataError(f"{where}: expected 'prompt' or 'messages' (fields: "
                                f'{sorted(record)})')
            if messages[-1]['role'] != 'user':
                raise DataError(f"{where}: the prompt must end with a user turn")
            prompts.append(messages)
    if not prompts:
        raise app.UsageError('give --prompts=FILE.jsonl or --prompt=TEXT')
    return prompts


def main(argv) -> int:
    del argv
    environment.start_tool()
    prompts = read_prompts()
    try:
        policy = load_policy(_WORKDIR.value)
    except ConfigError as error:  # not a workdir of a language model
        raise app.UsageError(str(error)) from None
    tokenizer, params = policy.tokenizer, policy.params
    sampler = policy.sampler(_K.value, _MAX_NEW.value)
    sampling = SamplingParams(_TEMPERATURE.value)
    lines = iter(sys.stdin)
    written = skipped = 0
    with open(_OUT.value, 'a') as out:
        for number, messages in enumerate(prompts, start=1):
            (replies,) = sample_replies(sampler, params, tokenizer, [messages],
                                        jax.random.fold_in(jax.random.key(_SEED.value), number),
                                        sampling, n=_K.value)
            print(f'\n=== prompt {number} of {len(prompts)} ===')
            for message in messages:
                print(f'{message["role"]}: {message["content"]}')
            for i, reply in enumerate(replies, start=1):
                print(f'--- reply {i} ---\n{reply}')
            while True:
                print('ranks (1 = best, equal ranks tie; s skips, q quits): ', end='',
                      flush=True)
                answer = next(lines, 'q').strip()
                if answer in ('s', 'q'):
                    break
                try:
                    ranks = parse_ranking(answer, replies)
                except ValueError as error:
                    print(error)
                    continue
                out.write(json.dumps(preference.k_way_record(messages, replies, ranks)) + '\n')
                out.flush()
                written += 1
                break
            if answer == 'q':
                break
            skipped += answer == 's'
    print(f'\nappended {written} ranked prompts to {_OUT.value} ({skipped} skipped)')
    return 0


if __name__ == '__main__':
    sys.exit(app.run(main))
