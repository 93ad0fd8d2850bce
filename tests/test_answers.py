"""Checkable final answers (GSM8K's `#### N` and the number a reply gives), the prompt reader
that uses them and the RL stage's format reward: `python -m pytest -q tests/test_answers.py`."""

import json
import pathlib

import numpy as np
import pytest

from gptstack.config import ConfigError
from gptstack.data import answers
from gptstack.data.prompts import Prompt, read_prompts
from gptstack.data.sources import DataError, SkipBudget

GSM8K = pathlib.Path(__file__).parents[2] / 'shared' / 'data' / 'gsm8k'


@pytest.mark.parametrize('written, number', [
    ('72', '72'), ('1,000', '1000'), ('-5', '-5'), ('+5', '5'), ('3.50', '3.5'), ('7.0', '7'),
    ('$12', '12'), (' 72. ', '72'), ('.5', '0.5'), ('-0.25', '-0.25'),
    ('1,234,567.80', '1234567.8'), ('seven', None), ('', None), ('3 4', None), ('1.2.3', None)])
def test_numbers_are_normalised_however_they_are_written(written, number):
    assert answers.normalise_number(written) == number


def test_final_answers_and_reply_numbers():
    assert answers.final_answer('48/2 = <<48/2=24>>24\nSo 48+24 = 72.\n#### 1,072', 'f:3') == '1072'
    with pytest.raises(DataError, match=r"^f:3: the answer has no '####' line"):
        answers.final_answer('The answer is 72.', 'f:3')
    with pytest.raises(DataError, match=r"^f:4: '####' is followed by 'many', not a number$"):
        answers.final_answer('#### many', 'f:4')
    reply = 'She had 48 clips, sold 24 more, so 72 in all. #### 72 clips'
    assert answers.reply_number(reply, 'last_number') == '72'
    assert answers.reply_number('It is -3.0, not 4', 'last_number') == '4'
    assert answers.reply_number('It is -3.0', 'last_number') == '-3'
    assert answers.reply_number('#### 5 then 6 #### $1,200 or 7', 'marked_number') == '1200'
    assert answers.reply_number('no marker 5', 'marked_number') is None
    assert answers.reply_number('no number', 'last_number') is None


def test_gsm8k_records_become_prompts_scored_by_their_final_number(tmp_path):
    path = tmp_path / 'g.jsonl'
    records = [{'question': 'What is 12 * 100?', 'answer': '12 * 100 = 1200\n#### 1,200'},
               {'question': 'And 2 - 7?', 'answer': '2 - 7 = -5\n#### -5'},
               {'question': 'No final line', 'answer': 'It is 3.'}]
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    with pytest.raises(DataError, match=rf"^{path}:3: the answer has no '####' line"):
        read_prompts(path, SkipBudget(0), prompt_field='question', answer_format='gsm8k',
                     match='last_number')
    budget = SkipBudget(1)
    first, second = read_prompts(path, budget, prompt_field='question', answer_format='gsm8k',
                                 match='last_number')
    assert budget.skipped == 1
    assert first.messages == [{'role': 'user', 'content': 'What is 12 * 100?'}]
    assert first.answer == '1200'
    assert first.gold('12 times 100 is 1,200.') == 1.0 and first.gold('1200 or 1201') == 0.0
    assert second.gold('The answer is -5') == 1.0 and second.gold('5') == 0.0
    # Exact match of the text is the default for other records.
    (plain,) = read_prompts(_write(tmp_path, {'prompt': 'Say hi', 'answer': 'hi'}), SkipBudget(0))
    assert plain.gold(' hi ') == 1.0 and plain.gold('hi!') == 0.0


def test_a_format_reward_pays_for_a_readable_final_answer_right_or_wrong(tokenizer):
    from experiments import rl
    from experiments.configs import rl as rl_configs

    marked = Prompt([{'role': 'user', 'content': 'What is 5 + 7?'}], answer='12',
                    match='marked_number')
    last = Prompt(marked.messages, answer='12', match='last_number')
    replies = ['5 + 7 = 12\n#### 12', '5 + 7 = 13\n#### 13', 'It is 12.', 'I do not know.']
    assert [marked.formatted(r) for r in replies] == [True, True, False, False]
    assert [last.formatted(r) for r in replies] == [True, True, True, False]
    with pytest.raises(ValueError, match='a format reward needs a number match'):
        Prompt(marked.messages, answer='12').formatted('12')

    # The stage's judge: the gold score, plus the bonus for each readable answer.
    ids = [[*tokenizer.encode(r), tokenizer.end_of_turn_id] for r in replies]
    responses = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for row, reply in enumerate(ids):
        responses[row, :len(reply)] = reply
    lengths = np.asarray([len(reply) for reply in ids])
    batch = {'index': np.asarray([0, 0, 1, 1])}
    judged = rl.make_judge(tokenizer, [marked, last], format_reward=0.25)(batch, responses,
                                                                          lengths)
    assert judged['gold'].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert judged['formatted'].tolist() == [True, True, True, False]
    assert judged['reward'].tolist() == [1.25, 0.25, 1.25, 0.0]
    plain = rl.make_judge(tokenizer, [marked, last])(batch, responses, lengths)
    assert plain['reward'].tolist() == [1.0, 0.0, 1.0, 0.0] and 'formatted' not in plain

    # Paid only where there is a number to read, with verifiable rewards.
    config = rl_configs.get_config()
    config.rl.format_reward = 0.5
    config.rl.reward = 'gold'
    with pytest.raises(ConfigError, match=r"^rl.format_reward=0.5: a format reward is paid with "
                                          r"verifiable rewards of a number match .* not "
                                          r"rl.reward='gold' with data.match='text'$"):
        rl.validate(config)


def _write(tmp_path, record):
    path = tmp_path / 'p.jsonl'
    path.write_text(json.dumps(record) + '\n')
    return path


@pytest.mark.skipif(not GSM8K.exists(), reason='../shared/data/gsm8k is not here')
def test_every_gsm8k_record_is_read_with_its_final_number():
    """Through the RL stage's own reading of `rl_gsm8k.py`'s settings."""
    from experiments import rl
    from experiments.configs import rl_gsm8k

    config = rl_gsm8k.get_config()
    config.data.train, config.data.validation = (str(GSM8K / f'{split}.jsonl')
                                                 for split in ('train', 'test'))
    for split, count in (('train', 7473), ('validation', 1319)):
        prompts = rl.read_split(config, split)
        assert len(prompts) == count
        assert all(p.answer is not None and p.gold(f'So it is {p.answer}.') == 1.0
                   for p in prompts)
