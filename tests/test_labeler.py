"""The simulated labeler's comparison files: `python -m pytest -q tests/test_labeler.py`."""

import json

import ml_collections
import numpy as np

from gptstack import labeler
from gptstack.data import tasks


def test_oversampling_keeps_the_groups_whose_replies_differ(tmp_path, monkeypatch):
    # Replies to 8 prompts (2 per group); groups 1, 4, 5 and 7 differ in gold score.
    scores = np.zeros((8, 2))
    scores[[1, 4, 5, 7], 0] = 1.0

    def sample_and_score(sampler, params, tokenizer, drawn, key, sampling, n, progress):
        assert len(drawn) == 8 and n == 2
        return scores, [[f'reply {i}.{j}' for j in range(2)] for i in range(8)]

    monkeypatch.setattr(labeler.gold, 'sample_and_score', sample_and_score)
    config = ml_collections.ConfigDict({
        'seed': 0, 'data': {'completions': 2},
        'labeler': {'temperature': 1.0, 'noise': 0.0, 'oversample': 2}})
    stats = labeler.label(config, None, None, None, 'train', 4, tmp_path / 'train.jsonl')
    drawn = tasks.generate('train', 8, 0)
    records = [json.loads(line) for line in (tmp_path / 'train.jsonl').read_text().splitlines()]
    assert [r['prompt'] for r in records] == [drawn[i].prompt for i in (1, 4, 5, 7)]
    assert [r['completions'][0] for r in records] == [
        'reply 1.0', 'reply 4.0', 'reply 5.0', 'reply 7.0']
    assert stats['sampled_prompts'] == 8 and stats['groups'] == 4 and stats['all_tied'] == 0
