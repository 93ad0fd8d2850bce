"""Comparison data: the three layouts, HH splitting, rendering with the reward token, the
simulated labeler. Run: `python -m pytest -q tests/test_data_preference.py`.
"""

import gzip
import json
import math
import pathlib

import numpy as np
import pytest

from experiments import rank
from gptstack.data import preference
from gptstack.data.sources import DataError, SkipBudget
from gptstack.data.tokenizer import render_chat

HH = (pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'hh_rlhf_harmless_base' /
      'test.jsonl.gz')


def test_pairwise_and_k_way_layouts():
    pair = preference.comparison_from_record(
        {'prompt': 'Name a colour.', 'chosen': 'Blue.', 'rejected': '', 'id': 7}, 'f:1')
    assert pair.prompt == [{'role': 'user', 'content': 'Name a colour.'}]
    assert pair.completions == [[{'role': 'assistant', 'content': 'Blue.'}],
                                [{'role': 'assistant', 'content': ''}]]
    assert pair.ranks == [1, 2] and pair.pairs == 1
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    k_way = preference.comparison_from_record(
        {'prompt': messages, 'completions': ['a', 'b', 'c', 'd'], 'ranking': [2, 1, 2, 3]}, 'f:2')
    assert k_way.prompt == messages and k_way.ranks == [2, 1, 2, 3]
    assert k_way.pairs == 5  # b>a, b>c, b>d, a>d, c>d; a and c tie


def test_hh_layout_splits_at_the_last_common_assistant_turn():
    shared = '\n\nHuman: How do I bake bread?\n\nAssistant: Flour and water.\n\nHuman: And?'
    record = {'chosen': shared + '\n\nAssistant: Yeast, then an oven.',
              'rejected': shared + '\n\nAssistant: Yeast is not needed.'}
    comparison = preference.comparison_from_record(record, 'f:3')
    assert comparison.prompt == [
        {'role': 'user', 'content': 'How do I bake bread?'},
        {'role': 'assistant', 'content': 'Flour and water.'},
        {'role': 'user', 'content': 'And?'}]
    assert comparison.completions == [[{'role': 'assistant', 'content': 'Yeast, then an oven.'}],
                                      [{'role': 'assistant', 'content': 'Yeast is not needed.'}]]
    # Dialogues that diverge at an earlier turn: the prompt stops there, the completions carry
    # the remaining turns.
    early = preference.comparison_from_record(
        {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!',
         'rejected': '\n\nHuman: Hi\n\nAssistant: Go away'}, 'f:4')
    assert early.prompt == [{'role': 'user', 'content': 'Hi'}]
    assert [len(c) for c in early.completions] == [3, 1]


@pytest.mark.parametrize('record, message', [
    ({'prompt': 'p', 'completions': ['a', 'b']},
     "f:9: a K-way record needs 'ranking' (fields: ['completions', 'prompt'])"),
    ({'prompt': 'p', 'completions': ['a', 'b'], 'ranking': [1]},
     "f:9: field 'ranking' must be a list of 2 integers, the rank of each completion"),
    ({'prompt': 'p', 'completions': ['a', 'b'], 'ranking': [1, 1.5]},
     "f:9: field 'ranking' must be a list of 2 integers"),
    ({'prompt': 'p', 'completions': ['a', 'b'], 'ranking': [1, 3]},
     "f:9: field 'ranking' [1, 3]: ranks go from 1 (best) to 2, the number of completions"),
    ({'prompt': 'p', 'completions': ['a', 'b'], 'ranking': [0, 1]},
     "f:9: field 'ranking' [0, 1]: ranks go from 1 (best) to 2"),
    ({'prompt': 'p', 'completions': ['a', 'b', 'a'], 'ranking': [1, 2, 3]},
     'f:9: completions[0] and completions[2] are identical but ranked 1 and 3'),
    ({'prompt': 'p', 'chosen': 'same', 'rejected': 'same'},
     "f:9: fields 'chosen' and 'rejected' are identical, so the pair prefers nothing"),
    ({'chosen': '\n\nHuman: hi\n\nAssistant: a', 'rejected': '\n\nHuman: hi\n\nAssistant: a'},
     "f:9: fields 'chosen' and 'rejected' are identical"),
    ({'prompt': 'p', 'completions': ['a'], 'ranking': [1]},
     "f:9: field 'completions' must be a list of at least 2 completions"),
    ({'prompt': '  ', 'chosen': 'a', 'rejected': 'b'}, "f:9: field 'prompt' is empty"),
    ({'prompt': 'p', 'chosen': [{'role': 'user', 'content': 'x'}], 'rejected': 'b'},
     "f:9: field 'chosen' must be a string or a list of messages that starts with the "
     "assistant's turn"),
    ({'prompt': [{'role': 'robot', 'content': 'x'}], 'chosen': 'a', 'rejected': 'b'},
     "f:9: prompt[0].role 'robot': expected one of ['assistant', 'system', 'user']"),
    ({'chosen': 'Human: hi Assistant: a', 'rejected': 'Human: hi Assistant: b'},
     "f:9: 'chosen' and 'rejected' share no dialogue before an assistant turn"),
    ({'chosen': '\n\nHuman: hi\n\nAssistant: a', 'rejected': 5},
     "f:9: field 'rejected' must be a string"),
    ({'question': 'q', 'answer': 'a'},
     "f:9: expected {prompt, chosen, rejected}, {prompt, completions, ranking} or HH {chosen, "
     "rejected} (fields: ['answer', 'question'])"),
])
def test_malformed_records_are_rejected_with_the_field(record, message):
    with pytest.raises(DataError) as error:
        preference.comparison_from_record(record, 'f:9')
    assert str(error.value).startswith(message)


def test_reader_handles_gzip_and_counts_skips(tmp_path):
    path = tmp_path / 'c.jsonl.gz'
    lines = [json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}), '{"prompt": 1}',
             json.dumps({'prompt': 'q', 'completions': ['x', 'y'], 'ranking': [2, 1]})]
    path.write_bytes(gzip.compress('\n'.join(lines).encode()))
    with pytest.raises(DataError, match=f'{path}:2: expected'):
        list(preference.read_comparisons(path, SkipBudget()))
    budget = SkipBudget(1)
    read = list(preference.read_comparisons(path, budget))
    assert [c.where for c in read] == [f'{path}:1', f'{path}:3']
    assert budget.by_reason == {'bad comparison': 1}


def test_tied_identical_completions_are_kept():
    comparison = preference.comparison_from_record(
        {'prompt': 'p', 'completions': ['a', 'a', 'b'], 'ranking': [1, 1, 2]}, 'f:1')
    assert comparison.ranks == [1, 1, 2] and comparison.pairs == 2


def test_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = tmp_path / 'exported.jsonl'
    lines = [json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}),
             json.dumps({'prompt': 'q', 'chosen': 'c', 'rejected': 'd'})]
    path.write_bytes(b'\xef\xbb\xbf' + '\r\n'.join(lines).encode() + b'\r\n')
    read = list(preference.read_comparisons(path, SkipBudget()))
    assert [c.prompt[0]['content'] for c in read] == ['p', 'q']
    assert [c.completions[0][0]['content'] for c in read] == ['a', 'c']


@pytest.mark.skipif(not HH.exists(), reason='the shared datasets are not present')
def test_every_hh_harmless_record_is_read():
    comparisons = list(preference.read_comparisons(HH, SkipBudget()))
    assert len(comparisons) == 2312  # the README's count
    assert all(c.prompt[0]['role'] == 'user' and c.ranks == [1, 2] for c in comparisons)
    assert all(c.completions[i][0]['role'] == 'assistant' for c in comparisons for i in (0, 1))
    # The README: in 5 pairs the dialogues diverge before the last assistant turn.
    assert sum(max(map(len, c.completions)) > 1 for c in comparisons) == 5


def test_rendering_appends_the_reward_token_after_every_completion(tokenizer):
    comparisons = [
        preference.Comparison('a', [{'role': 'user', 'content': 'Say hi.'}],
                              [[{'role': 'assistant', 'content': c}] for c in ('hi', 'no', '')],
                              [1, 2, 2]),
        preference.Comparison('b', [{'role': 'user', 'content': 'x'}],
                              [[{'role': 'assistant', 'content': c}] for c in ('u', 'v')], [1, 1]),
    ]
    examples, stats = preference.render_comparisons(tokenizer, comparisons, 24, 4)
    assert stats.groups == 1 and stats.all_tied == 1 and stats.pairs == 2
    (example,) = examples
    assert example['valid'].tolist() == [1, 1, 1, 0] and example['ranks'].tolist() == [1, 2, 2, 0]
    for i, text in enumerate(('hi', 'no', '')):
        ids = render_chat(tokenizer, [{'role': 'user', 'content': 'Say hi.'},
                                      {'role': 'assistant', 'content': text}])[0]
        n = example['lengths'][i]
        assert example['tokens'][i, :n].tolist() == [*ids, tokenizer.reward_id]
        assert (example['tokens'][i, n:] == tokenizer.pad_id).all()
    batch = preference.to_model_batch({k: v[None] for k, v in example.items()})
    assert batch['segment_ids'][0, 0].tolist() == [1] * example['lengths'][0] + [0] * (
        24 - example['lengths'][0])
    assert batch['positions'].shape == (1, 4, 24)


def test_reply_masks_cover_the_completions_own_tokens_even_when_truncated(tokenizer):
    prompt = [{'role': 'user', 'content': 'Name a colour.'},
              {'role': 'assistant', 'content': 'Red.'},  # an earlier turn: not the completion's
              {'role': 'user', 'content': 'Another one.'}]
    completions = [[{'role': 'assistant', 'content': c}] for c in ('Blue.', 'green and more')]
    comparison = preference.Comparison('c', prompt, completions, [1, 2])
    for seq_len, truncate in ((64, False), (12, True)):
        (example,), _ = preference.render_comparisons(tokenizer, [comparison], seq_len, 3,
                                                      truncate=truncate, with_reply_mask=True)
        for i, completion in enumerate(completions):
            n = example['lengths'][i]
            row, mask = example['tokens'][i, :n], example['reply_mask'][i, :n]
            reply = [*tokenizer.encode(completion[0]['content']), tokenizer.end_of_turn_id]
            # The reply's content and end of turn, just before <|reward|>, and nothing else.
            assert row[mask == 1].tolist() == reply[-int(mask.sum()):]
            assert mask[-1] == 0 and mask[-len(reply) - 1:-1].tolist() == [1] * min(
                len(reply), n - 1)
        assert (example['reply_mask'][2] == 0).all()  # the empty slot
    batch = preference.to_model_batch({k: v[None] for k, v in example.items()})
    assert batch['reply_mask'].shape == (1, 3, 12)
    (plain,), _ = preference.render_comparisons(tokenizer, [comparison], 64, 3)
    assert 'reply_mask' not in preference.to_model_batch({k: v[None] for k, v in plain.items()})


def test_over_long_rows_are_an_error_or_lose_the_start_of_the_prompt(tokenizer):
    long = preference.Comparison('f:5', [{'role': 'user', 'content': 'word ' * 40}],
                                 [[{'role': 'assistant', 'content': c}] for c in ('ok', 'no')],
                                 [1, 2])
    with pytest.raises(DataError, match=r'f:5: completion 0 with its prompt has \d+ tokens, '
                                         'more than data.seq_len=16'):
        preference.render_comparisons(tokenizer, [long], 16, 2)
    (example,), stats = preference.render_comparisons(tokenizer, [long], 16, 2, truncate=True)
    assert stats.truncated == 2 and example['lengths'].tolist() == [16, 16]
    ending = render_chat(tokenizer, [{'role': 'assistant', 'content': 'ok'}])[0][1:]
    assert example['tokens'][0, -len(ending) - 1:].tolist() == [*ending, tokenizer.reward_id]
    with pytest.raises(DataError, match=r'f:5: 2 completions, more than data\.max_completions=1'):
        preference.render_comparisons(tokenizer, [long], 64, 1)


def test_eval_batches_pad_with_empty_groups(tokenizer):
    comparisons = [preference.Comparison(str(i), [{'role': 'user', 'content': str(i)}],
                                         [[{'role': 'assistant', 'content': 'a'}]] * 2, [1, 2])
                   for i in range(5)]
    examples, _ = preference.render_comparisons(tokenizer, comparisons, 16, 3)
    batches = preference.make_preference_eval_batches(examples, 4, max_batches=10)
    assert len(batches) == 2 and batches[1]['valid'].sum() == 2  # 1 real group + 3 empty
    stream = iter(preference.make_preference_dataset(examples, 2, seed=0))
    assert next(stream)['tokens'].shape == (2, 3, 16)
    # On 2 processes each holds its half of the same global batches, in order.
    halves = [preference.make_preference_eval_batches(examples, 2, max_batches=10,
                                                      process_index=i, process_count=2)
              for i in range(2)]
    for batch, first, second in zip(batches, *halves, strict=True):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_a_branched_group_is_its_prompt_then_each_completion_with_the_reward_token(tokenizer):
    prompt = [{'role': 'user', 'content': 'Say hi.'}]
    replies = ('hi', 'no', '')
    comparisons = [
        preference.Comparison('a', prompt, [[{'role': 'assistant', 'content': c}]
                                            for c in replies], [1, 2, 2]),
        preference.Comparison('b', [{'role': 'user', 'content': 'x'}],
                              [[{'role': 'assistant', 'content': c}] for c in ('u', 'v')], [1, 1]),
    ]
    examples, stats = preference.render_branched(tokenizer, comparisons, 64, 4)
    assert stats.groups == 1 and stats.all_tied == 1 and stats.pairs == 2
    (example,) = examples
    assert set(example) == set(preference.BRANCHED_FIELDS)
    prompt_ids = render_chat(tokenizer, prompt)[0]
    p = len(prompt_ids)
    assert example['tokens'][:p].tolist() == prompt_ids
    assert example['branch_ids'][:p].tolist() == [0] * p
    assert example['positions'][:p].tolist() == list(range(p))
    for branch, (reply, expected_rank) in enumerate(zip(replies, (1, 2, 2), strict=True),
                                                    start=1):
        on = example['branch_ids'] == branch
        full = render_chat(tokenizer, [*prompt, {'role': 'assistant', 'content': reply}])[0]
        # Prompt and branch together are the completion's row as the flat layout renders it.
        assert [*prompt_ids, *example['tokens'][on]] == [*full, tokenizer.reward_id]
        assert example['positions'][on].tolist() == list(range(p, p + on.sum()))
        assert (example['ranks'][on] == expected_rank).all()
    assert (example['group'] == 1).all() and stats.tokens == len(example['tokens'])


def test_over_long_groups_are_an_error_or_lose_the_start_of_the_prompt(tokenizer):
    long = preference.Comparison('f:5', [{'role': 'user', 'content': 'word ' * 40}],
                                 [[{'role': 'assistant', 'content': c}] for c in ('ok', 'no')],
                                 [1, 2])
    with pytest.raises(DataError, match=r'f:5: the prompt and its 2 completions have \d+ tokens, '
                                         r'more than data.seq_len=24; shorten them or set '
                                         r'data.truncate=True'):
        preference.render_branched(tokenizer, [long], 24, 2)
    (example,), stats = preference.render_branched(tokenizer, [long], 24, 2, truncate=True)
    assert stats.truncated == 1 and len(example['tokens']) == 24
    whole, _ = preference.render_branched(tokenizer, [long], 256, 2)
    kept = whole[0]['tokens'][-24:]  # the completions whole, the prompt's end
    np.testing.assert_array_equal(example['tokens'], kept)
    replies = int((whole[0]['branch_ids'] > 0).sum())
    assert (example['branch_ids'][:24 - replies] == 0).all()
    assert example['positions'].tolist()[:24 - replies] == list(range(24 - replies))
    # Completions too long for the row without the prompt: the longer loses its start first.
    wordy = preference.Comparison('f:6', [{'role': 'user', 'content': 'hi'}],
                                  [[{'role': 'assistant', 'content': c}] for c in
                                   ('ok', 'word ' * 30)], [1, 2])
    (whole,), _ = preference.render_branched(tokenizer, [wordy], 256, 2)
    short, long_reply = (whole['tokens'][whole['branch_ids'] == i] for i in (1, 2))
    (cut,), stats = preference.render_branched(tokenizer, [wordy], len(short) + 6, 2,
                                               truncate=True)
    assert stats.truncated == 1 and (cut['branch_ids'] > 0).all()
    np.testing.assert_array_equal(cut['tokens'], [*short, *long_reply[-6:]])
    assert cut['positions'].tolist() == [*range(len(short)), *range(6)]
    (even,), _ = preference.render_branched(tokenizer, [wordy], 4, 2, truncate=True)
    assert even['tokens'].tolist() == [*short[-2:], *long_reply[-2:]]
    with pytest.raises(DataError, match=r'f:6: the prompt and its 2 completions have \d+ tokens, '
                                         r'more than data.seq_len=1 \(a row must hold at least '
                                         r'the reward token of each\)'):
        preference.render_branched(tokenizer, [wordy], 1, 2, truncate=True)
    # The prompt and the longest completion must fit the model's context too.
    context = len(long_reply) + 1
    with pytest.raises(DataError, match=r"f:6: the prompt and its longest completion have \d+ "
                                        rf"tokens, more than the model's max_seq_len={context}; "
                                        'shorten them or set data.truncate=True'):
        preference.render_branched(tokenizer, [wordy], 256, 2, max_len=context)
    (fits,), _ = preference.render_branched(tokenizer, [wordy], 256, 2, max_len=context,
                                            truncate=True)
    prompt = fits['tokens'][fits['branch_ids'] == 0]
    assert len(prompt) == 1 and fits['positions'].max() == context - 1


def test_branched_groups_are_packed_whole_and_each_evaluated_once(tokenizer):
    comparisons = [preference.Comparison(str(i), [{'role': 'user', 'content': 'n ' * i}],
                                         [[{'role': 'assistant', 'content': 'a'}],
                                          [{'role': 'assistant', 'content': 'b c'}]], [1, 2])
                   for i in range(9)]
    examples, _ = preference.render_branched(tokenizer, comparisons, 32, 3)
    batches = preference.make_branched_eval_batches(examples, 32, 2, max_batches=10)
    seen = []
    for batch in batches:
        for row in range(2):
            for segment in np.unique(batch['segment_ids'][row]):
                if segment == 0:
                    continue
                on = batch['segment_ids'][row] == segment
                (group,) = np.unique(batch['group'][row][on])
                # A whole group, in one row, its tokens in order.
                np.testing.assert_array_equal(batch['tokens'][row][on],
                                              examples[group - 1]['tokens'])
                seen.append(group)
    assert sorted(seen) == list(range(1, 10))
    stream = iter(preference.make_branched_dataset(examples, 32, 2, seed=0))
    assert next(stream)['tokens'].shape == (2, 32)
    # On 2 processes each holds its half of the same global batches, in order.
    halves = [preference.make_branched_eval_batches(examples, 32, 1, max_batches=10,
                                                    process_index=i, process_count=2)
              for i in range(2)]
    for batch, first, second in zip(batches, *halves, strict=True):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_simulated_labeler_ranks_by_gold_and_flips_like_bradley_terry():
    rng = np.random.default_rng(0)
    assert preference.simulated_ranking([0.5, 1.0, 0.0, 0.5], 0.0, rng) == [2, 1, 3, 2]
    # Equal gold scores stay tied whatever the noise.
    draws = [preference.simulated_ranking([1.0, 0.5, 0.5], 0.5, rng) for _ in range(4000)]
    assert all(r[1] == r[2] for r in draws)
    flipped = np.mean([r[0] > r[1] for r in draws])
    expected = 1 / (1 + math.exp(0.5 / 0.5))  # P(the worse one wins) = sigmoid(-(1-0.5)/0.5)
    assert abs(flipped - expected) < 4 * math.sqrt(expected * (1 - expected) / len(draws))


@pytest.mark.parametrize('typed, message', [
    ('1 2', 'expected 3 ranks, one per reply, each a whole number from 1 to 3'),
    ('1 4 2', 'expected 3 ranks, one per reply, each a whole number from 1 to 3'),
    ('2 2 2', 'all replies have the same rank'),
    ('1 2 3', 'replies 1 and 3 are identical: give them the same rank'),
])
def test_typed_rankings_are_checked_like_the_reader_checks_files(typed, message):
    replies = ['yes', 'no', 'yes']
    with pytest.raises(ValueError, match=message):
        rank.parse_ranking(typed, replies)
    assert rank.parse_ranking('1,2 1', replies) == [1, 2, 1]
