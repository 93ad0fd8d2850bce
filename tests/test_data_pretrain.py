"""Pretraining pipeline: packing, mixture, determinism, resume, caching.

Run: `python -m pytest -q tests/test_data_pretrain.py`.
"""

import json
import random

import numpy as np
import pytest

from gptstack.checkpoint import iterator_state
from gptstack.data import pretrain
from gptstack.data.sources import SourceSpec

T, B = 32, 8


def make_source(tmp_path, tokenizer, name, texts, weight=1.0, **kwargs):
    path = tmp_path / f'{name}.jsonl'
    path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    spec = SourceSpec(name, (str(path),), weight=weight)
    return pretrain.tokenize_source(spec, tokenizer, tmp_path / 'cache', **kwargs)


def short_texts(seed, n, words=(3, 12)):
    rng = random.Random(seed)
    vocab = ['alpha', 'beta', 'gamma', 'delta', 'def', 'return', 'x', '(', ')', ':', 'end.\n']
    return [' '.join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n)]


@pytest.fixture(scope='module')
def sources(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp('pretrain')
    # Documents of very different lengths: mixing by documents would miss the token weights.
    short = make_source(tmp, tokenizer, 'short', short_texts(0, 3000, (2, 6)), weight=0.7)
    long = make_source(tmp, tokenizer, 'long', short_texts(1, 1000, (20, 60)), weight=0.3)
    return short, long


def test_packing_keeps_every_token_once_and_restarts_segments(tokenizer, sources):
    source = sources[0]
    records = [np.frombuffer(r, np.int32) for r in
               pretrain.grain.sources.ArrayRecordDataSource([source.train_path])]
    rows = list(pretrain.source_rows(source.train_path, T, seed=0, shuffle=False))
    stream = np.concatenate([r['tokens'][r['tokens_segment_ids'] > 0] for r in rows])
    # No token lost or duplicated: the rows hold exactly the documents, in order.
    np.testing.assert_array_equal(stream, np.concatenate(records))
    assert len(stream) == source.meta['train_tokens']
    for r in rows:
        seg, pos, tok = r['tokens_segment_ids'], r['tokens_positions'], r['tokens']
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            # A segment starts a document (<|endoftext|>) unless it continues one at row start.
            assert tok[where[0]] == tokenizer.eot_id or where[0] == 0
        assert (tok[seg == 0] == 0).all()


def test_model_batch_masks_boundaries_and_padding():
    rows = {'tokens': np.array([[5, 6, 7, 8, 9, 0]]),
            'tokens_segment_ids': np.array([[1, 1, 2, 2, 2, 0]]),
            'tokens_positions': np.array([[0, 1, 0, 1, 2, 0]])}
    batch = pretrain.to_model_batch(rows)
    np.testing.assert_array_equal(batch['inputs'], [[5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(batch['targets'], [[6, 7, 8, 9, 0]])
    # 6->7 crosses documents and 9->pad is padding: neither counts.
    np.testing.assert_array_equal(batch['loss_mask'], [[1, 0, 1, 1, 0]])


def test_mixture_token_shares_follow_the_weights(sources):
    stream = iter(pretrain.make_train_dataset(list(sources), T, B, seed=0, keep_source=True))
    tokens = np.zeros(2)
    documents = 0
    while documents < 10_000:
        batch = next(stream)
        for row, source in zip(batch['tokens'], batch['source'], strict=True):
            tokens[source] += np.count_nonzero(row)
        documents += int(np.sum(batch['tokens'] == 1))  # <|endoftext|> opens each document
    shares = tokens / tokens.sum()
    assert abs(shares[0] - 0.7) < 0.02 and abs(shares[1] - 0.3) < 0.02, shares


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_same_seed_same_stream_and_exact_resume(sources):
    dataset = pretrain.make_train_dataset(list(sources), T, B, seed=3)
    first = take(iter(dataset), 12)
    again = take(iter(pretrain.make_train_dataset(list(sources), T, B, seed=3)), 12)
    other = take(iter(pretrain.make_train_dataset(list(sources), T, B, seed=4)), 12)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a['inputs'], c['inputs']) for a, c in zip(first, other,
                                                                             strict=True))
    # Save the state after any batch, restore it into a fresh iterator through the JSON a
    # checkpoint holds: the very next batches follow. Before a source is first drawn from, its
    # packing state holds the empty remainder (-1, -1), which JSON turns into a list.
    empty_remainders = 0
    for done in range(6):
        iterator = iter(dataset)
        take(iterator, done)
        saved = json.dumps(iterator.get_state())
        empty_remainders += saved.count('[-1, -1]')
        resumed = iter(pretrain.make_train_dataset(list(sources), T, B, seed=3))
        resumed.set_state(iterator_state(json.loads(saved)))
        for a, b in zip(take(resumed, 12 - done), first[done:], strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f'after {done} batches')
    assert empty_remainders


def test_processes_split_the_same_global_batches(sources):
    """Two processes' rows of each batch, stacked, are the one-process batch: the data, hence
    the losses, do not depend on the process count."""
    single = take(iter(pretrain.make_train_dataset(list(sources), T, 4, seed=3)), 5)
    halves = [take(iter(pretrain.make_train_dataset(list(sources), T, 2, seed=3,
                                                    process_index=i, process_count=2)), 5)
              for i in range(2)]
    for whole, first, second in zip(single, *halves, strict=True):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])


def test_eval_batches_are_padded_and_shared_evenly(sources):
    source = sources[0]
    single = pretrain.make_eval_batches(source, T, 4, max_batches=1000)
    halves = [pretrain.make_eval_batches(source, T, 2, max_batches=1000, process_index=i,
                                         process_count=2) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(single)
    counted = sum(int(b['loss_mask'].sum()) for b in single)
    assert counted == sum(int(b['loss_mask'].sum()) for h in halves for b in h)
    # Every validation token but the first of each packed segment is a counted target.
    rows = pretrain.source_rows(source.val_path, T, seed=0, shuffle=False)
    segments = sum(len(np.unique(r['tokens_segment_ids'][r['tokens_segment_ids'] > 0]))
                   for r in rows)
    assert counted == source.meta['val_tokens'] - segments
    capped = pretrain.make_eval_batches(source, T, 4, max_batches=2)
    assert len(capped) == 2


def test_split_train_val_by_documents_or_tails():
    many = [[1, *range(10 * i, 10 * i + 9)] for i in range(40)]
    train, val = pretrain.split_train_val(many, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert sorted(map(tuple, train + val)) == sorted(map(tuple, many))
    few = [[1, *range(100)], [1, *range(50)]]
    train, val = pretrain.split_train_val(few, 0.1, seed=0)
    assert [len(d) for d in val] == [1 + 10, 1 + 5]
    assert all(v[0] == 1 for v in val)
    assert [t + v[1:] for t, v in zip(train, val, strict=True)] == few


def test_tokenization_is_cached(tmp_path, tokenizer, monkeypatch):
    first = make_source(tmp_path, tokenizer, 'c', short_texts(5, 50))

    def fail(*args, **kwargs):
        raise AssertionError('re-tokenized although the cache is valid')

    monkeypatch.setattr(pretrain, 'read_source', fail)
    second = pretrain.tokenize_source(first.spec, tokenizer, tmp_path / 'cache')
    assert second.directory == first.directory and second.meta == first.meta
    with pytest.raises(AssertionError, match='re-tokenized'):  # another val split: new entry
        pretrain.tokenize_source(first.spec, tokenizer, tmp_path / 'cache', val_fraction=0.2)
