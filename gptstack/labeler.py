"""Comparisons made the way the InstructGPT recipe makes them, with a simulated labeler: `K`
replies per task prompt are sampled from the SFT policy and ranked by the gold scorer plus
Bradley-Terry noise (`noise`).

They are written to `<workdir>/comparisons/{train,validation}.jsonl` in the K-way layout of
`gptstack.data.preference` (with the gold scores as an extra field), exactly what a person ranking
with `experiments/rank.py` writes, and read back through the same loader. `labeler.json` holds
the labeler's statistics: groups, all-tied groups, ranked pairs, and how often it agrees with the
gold scorer.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import numpy as np

from gptstack import sharding
from gptstack.data import preference, tasks
from gptstack.evals import gold
from gptstack.files import write_whole
from gptstack.sampling import SamplingParams

log = logging.getLogger(__name__)
STATS = 'labeler.json'


def label(config, sampler, params, tokenizer, split: str, n_prompts: int,
          path: pathlib.Path) -> dict:
    """Samples `data.completions` replies to task prompts of `split`, ranks them with the
    simulated labeler and writes `n_prompts` K-way groups to a JSONL, whole
    (`gptstack.files.write_whole`; in a multi-process run every process samples its share and
    process 0 writes). With `labeler.oversample` > 1, replies to that many times
    more prompts are drawn and the groups whose replies differ in gold score go first: a group
    of tied replies teaches a reward model nothing. Returns the labeler's statistics, with the
    seconds it took."""
    start = time.perf_counter()
    oversample = config.labeler.get('oversample', 1)
    drawn = tasks.generate(split, n_prompts * oversample, config.seed)
    stream = list(tasks.SPLITS).index(split)  # one random stream per split, the same each run
    key = jax.random.fold_in(jax.random.key(config.seed), stream)
    scores, replies = gold.sample_and_score(
        sampler, params, tokenizer, drawn, key, SamplingParams(config.labeler.temperature),
        n=config.data.completions, progress=f'sampling {split} replies')
    if oversample > 1:  # informative groups first, each part in the order drawn
        order = sorted(range(len(drawn)), key=lambda i: len(set(scores[i].tolist())) == 1)
        chosen = sorted(order[:n_prompts])
        drawn, replies, scores = ([drawn[i] for i in chosen], [replies[i] for i in chosen],
                                  scores[chosen])
    rng = np.random.default_rng([config.seed, stream])
    stats = {'sampled_prompts': n_prompts * oversample, 'groups': 0, 'all_tied': 0, 'pairs': 0,
             'gold_pairs': 0, 'labeler_agrees': 0}
    lines = []
    for task, texts, group_gold in zip(drawn, replies, scores.tolist(), strict=True):
        ranks = preference.simulated_ranking(group_gold, config.labeler.noise, rng)
        lines.append(json.dumps(preference.k_way_record(
            task.messages(with_answer=False), texts, ranks, gold=group_gold,
            family=task.family, level=task.level)) + '\n')
        stats['groups'] += 1
        stats['all_tied'] += len(set(ranks)) == 1
        for i in range(len(texts)):
            for j in range(len(texts)):
                stats['pairs'] += ranks[i] < ranks[j]
                if group_gold[i] > group_gold[j]:
                    stats['gold_pairs'] += 1
                    stats['labeler_agrees'] += ranks[i] < ranks[j]
    if jax.process_index() == 0:
        write_whole(path, ''.join(lines))
    log.info('%s comparisons: %s', split, stats)
    return {**stats, 'seconds': time.perf_counter() - start}


def comparisons(config, directory: pathlib.Path, make_sampler, params, tokenizer) -> dict:
    """Makes the train and validation comparison files in `directory` once (a resumed run
    reads them back) and returns the labeler's statistics."""
    directory.mkdir(exist_ok=True)
    stats_path = directory / STATS
    if not stats_path.exists():
        sampler = make_sampler()
        stats = {split: label(config, sampler, params, tokenizer, split, n,
                              directory / f'{split}.jsonl')
                 for split, n in (('train', config.data.train_prompts),
                                  ('validation', config.data.validation_prompts))}
        stats['noise'] = config.labeler.noise
        if jax.process_index() == 0:
            write_whole(stats_path, json.dumps(stats, indent=1))
        sharding.barrier('comparisons written')
    return json.loads(stats_path.read_text())
