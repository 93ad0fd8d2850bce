"""Checkable final answers (GSM8K's `#### N` and the number a reply gives) and the prompt
reader that uses them: `python -m pytest -q tests/test_answers.py`."""

import json
import pathlib

import pytest

from gptstack.data import answers
from gptstack.data.prompts import read_prompts
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
