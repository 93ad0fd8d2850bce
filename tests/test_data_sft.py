"""SFT data: record validation, rendering, packing, assistant-only loss.

Run: `python -m pytest -q tests/test_data_sft.py`.
"""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from gptstack import losses
from gptstack import model as gpt_model
from gptstack.config import GPTConfig
from gptstack.data import sft
from gptstack.data.sources import DataError, SkipBudget

GOOD = {'messages': [{'role': 'system', 'content': 'Be brief.'},
                     {'role': 'user', 'content': 'Name a color.'},
                     {'role': 'assistant', 'content': 'Blue.'},
                     {'role': 'user', 'content': 'Another?'},
                     {'role': 'assistant', 'content': 'Green.'}]}


def read(tmp_path, records, max_skips=0):
    path = tmp_path / 'sft.jsonl'
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n'
                            for r in records))
    budget = SkipBudget(max_skips)
    return list(sft.read_conversations(path, budget)), budget


def user_assistant(user, assistant):
    return {'messages': [{'role': 'user', 'content': user},
                         {'role': 'assistant', 'content': assistant}]}


@pytest.mark.parametrize('record, message', [
    ({'messages': []}, "sft.jsonl:2: field 'messages' must be a non-empty list"),
    ({'messages': [{'role': 'user'}]},
     "sft.jsonl:2: messages[0] must be an object with 'role' and 'content'"),
    ({'messages': [{'role': 'robot', 'content': 'beep'}]},
     "sft.jsonl:2: messages[0].role 'robot': expected one of ['assistant', 'system', 'user']"),
    ({'messages': [{'role': 'user', 'content': ' '}, {'role': 'assistant', 'content': 'x'}]},
     'sft.jsonl:2: messages[0].content must be a non-empty string'),
    ({'messages': [{'role': 'user', 'content': 'hi'}]},
     "sft.jsonl:2: the conversation ends with a 'user' turn; it must end with an assistant turn"),
    ({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'system', 'content': 'b'},
                   {'role': 'assistant', 'content': 'c'}]},
     'sft.jsonl:2: messages[1]: a system turn may only come first'),
    ({'prompt': 'hi', 'response': 3}, "sft.jsonl:2: field 'response' must be a non-empty string"),
    ({'text': 'hi'}, "sft.jsonl:2: expected 'messages' or 'prompt' and 'response' "
                     "(fields: ['text'])"),
    ('{"messages": [', 'sft.jsonl:2: invalid JSON'),
])
def test_malformed_records_name_file_line_and_field(tmp_path, record, message):
    with pytest.raises(DataError, match=re.escape(message)):
        read(tmp_path, [GOOD, record])


def test_both_layouts_and_skips(tmp_path):
    conversations, budget = read(tmp_path, [GOOD, {'prompt': 'p', 'response': 'r'}, '[1]',
                                            {'messages': 'no'}], max_skips=2)
    assert [m for _, m in conversations] == [GOOD['messages'], [
        {'role': 'user', 'content': 'p'}, {'role': 'assistant', 'content': 'r'}]]
    assert dict(budget.by_reason) == {'not an object': 1, 'bad conversation': 1}


def test_overlong_conversations_error_or_truncate(tokenizer):
    long = [('x.jsonl:1', user_assistant('short question', 'word ' * 100)['messages'])]
    with pytest.raises(DataError, match=r'x\.jsonl:1: the conversation has \d+ tokens, more '
                                        r'than a row of 33 \(data\.seq_len \+ 1\)'):
        sft.render_examples(tokenizer, long, seq_len=32)
    examples, stats = sft.render_examples(tokenizer, long, seq_len=32, truncate=True)
    assert stats.truncated == 1 and len(examples[0]['tokens']) == 33
    prompt_only = [('x.jsonl:2', user_assistant('question ' * 100, 'answer')['messages'])]
    with pytest.raises(DataError, match='no assistant token is left after truncating'):
        sft.render_examples(tokenizer, prompt_only, seq_len=32, truncate=True)


def make_examples(tokenizer, n=12, seq_len=64):
    rng = np.random.default_rng(0)
    conversations = []
    for i in range(n):
        turns = [{'role': 'system', 'content': 'You help.'}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            turns += [{'role': 'user', 'content': f'question {rng.integers(1000)}?'},
                      {'role': 'assistant', 'content': f'answer {rng.integers(1000)}.'}]
        conversations.append((f'c:{i}', turns))
    return sft.render_examples(tokenizer, conversations, seq_len)[0]


def test_packing_keeps_conversations_whole_and_masks_assistant_targets(tokenizer):
    examples = make_examples(tokenizer)
    rows = sft.pack_in_order(examples, 64)
    assert len(rows) < len(examples)  # several conversations share a row
    seen = []
    for row in rows:
        segments = row['tokens_segment_ids']
        batch = sft.to_model_batch({k: v[None] for k, v in row.items()})
        for s in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(row['tokens_positions'][where], np.arange(len(where)))
            tokens = row['tokens'][where]
            example = next(e for e in examples if len(e['tokens']) == len(tokens) and
                           (e['tokens'] == tokens).all())
            seen.append(example['tokens'])
            # The loss counts exactly the assistant targets: positions whose next token is one.
            targets = where[:-1]
            np.testing.assert_array_equal(batch['loss_mask'][0, targets], example['mask'][1:])
            if where[-1] < 64:
                assert batch['loss_mask'][0, where[-1]] == 0  # never across conversations
    assert len(seen) == len(examples)  # every conversation once, none split


@pytest.fixture(scope='module')
def lm():
    config = GPTConfig.preset('toy', vocab_size=640, max_seq_len=64)
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(gpt_model.GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
    return jax.jit(lambda batch: nnx.merge(graphdef, params)(
        batch['inputs'], batch['positions'], batch['segment_ids']))


def loss_sum(logits, batch):
    return float(losses.next_token_loss(logits, batch['targets'], batch['loss_mask'])[0])


def test_only_assistant_targets_change_the_loss(tokenizer, lm):
    batch = sft.make_sft_eval_batches(make_examples(tokenizer), 64, 4, max_batches=1)[0]
    logits = lm(batch)
    base = loss_sum(logits, batch)
    rng = np.random.default_rng(1)
    checked = {0: 0, 1: 0}
    for position in map(tuple, np.argwhere(batch['segment_ids'] > 0)):
        changed = {**batch, 'targets': batch['targets'].copy()}
        changed['targets'][position] = (changed['targets'][position] + rng.integers(1, 600)) % 640
        if batch['loss_mask'][position]:
            assert loss_sum(logits, changed) != base
        else:
            assert loss_sum(logits, changed) == base
        checked[int(batch['loss_mask'][position])] += 1
    assert checked[0] > 20 and checked[1] > 20  # user/system and assistant targets both tried


def test_packed_loss_equals_each_conversation_alone(tokenizer, lm):
    examples = make_examples(tokenizer)
    packed = sft.make_sft_eval_batches(examples, 64, 4, max_batches=100)
    packed_total = sum(loss_sum(lm(b), b) for b in packed)
    alone_total = 0.0
    for example in examples:
        batch = sft.make_sft_eval_batches([example], 64, 4, max_batches=1)[0]
        alone_total += loss_sum(lm(batch), batch)
    np.testing.assert_allclose(packed_total, alone_total, rtol=1e-5)
    assert len(packed) < len(examples)  # several conversations really share rows


def test_training_stream_resumes_exactly(tokenizer):
    examples = make_examples(tokenizer, n=30)
    iterator = iter(sft.make_sft_dataset(examples, 64, 4, seed=0))
    [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(sft.make_sft_dataset(examples, 64, 4, seed=0))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_processes_split_the_same_global_batches(tokenizer):
    examples = make_examples(tokenizer, n=30)
    single = iter(sft.make_sft_dataset(examples, 64, 4, seed=0))
    halves = [iter(sft.make_sft_dataset(examples, 64, 2, seed=0, process_index=i,
                                        process_count=2)) for i in range(2)]
    for _ in range(4):
        whole, first, second = next(single), next(halves[0]), next(halves[1])
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
