"""Pretraining data: tokenized corpora mixed by weight and packed into fixed rows.

The pipeline, per source:
    documents --tokenize once, cache as ArrayRecord--> records of <= RECORD_TOKENS ids, each
    document starting with <|endoftext|> --shard by process, shuffle each epoch, repeat-->
    concatenate and split into rows of T+1 tokens (segment ids and positions restart at every
    document)
and then all sources are mixed row by row with the configured weights (the LLaMA table: a
source's weight is its share of training tokens), batched, and turned into the model batch
`inputs, targets, segment_ids, positions, loss_mask` of `[B, T]` arrays. A target counts only when
it continues the same document as its input, so nothing is predicted across a boundary or from
padding.

The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` resume exactly at the
next batch. Validation holds out whole documents (or, for sources with few documents, the tail of
every document) and is read in order, the same batches at every evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from gptstack.data.sources import DataError, SkipBudget, SourceSpec, fingerprint_inputs, read_source
from gptstack.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Long documents are stored in pieces so that a few long documents still shuffle and shard.
RECORD_TOKENS = 4096
# Sources with fewer documents hold out the tail of every document instead of whole documents.
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 20
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TokenizedSource:
    """A source tokenized into `train.array_record` / `val.array_record` (int32 records)."""

    spec: SourceSpec
    directory: pathlib.Path
    meta: dict

    @property
    def train_path(self) -> str:
        return str(self.directory / 'train.array_record')

    @property
    def val_path(self) -> str:
        return str(self.directory / 'val.array_record')


def tokenize_source(spec: SourceSpec, tokenizer: Tokenizer, cache_dir: str | os.PathLike, *,
                    val_fraction: float = 0.01, max_skips: int = 0,
                    seed: int = 0) -> TokenizedSource:
    """Tokenizes a source once and caches it; later calls with the same inputs read the cache.

    The cache key covers the tokenizer's sha256, the files (paths, sizes, mtimes), the validation
    fraction and the seed, so a change to any of them re-tokenizes.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f'data.val_fraction={val_fraction}: expected a fraction in (0, 1)')
    key = hashlib.sha256(json.dumps(
        [_CACHE_FORMAT, tokenizer.sha256, fingerprint_inputs(spec), val_fraction, seed,
         RECORD_TOKENS]).encode()).hexdigest()[:16]
    directory = pathlib.Path(cache_dir) / f'{spec.name}-{key}'
    if (directory / 'meta.json').exists():
        return TokenizedSource(spec, directory, json.loads((directory / 'meta.json').read_text()))

    budget = SkipBudget(max_skips)
    texts = list(read_source(spec, budget))
    documents = [[tokenizer.eot_id, *ids] for start in range(0, len(texts), 1024)
                 for ids in tokenizer.encode_batch(texts[start:start + 1024])]
    train, val = split_train_val(documents, val_fraction, seed)
    # Several processes of one run may tokenize the same source at once into a shared cache:
    # each writes its own temporary directory and the first to finish publishes it.
    tmp = directory.with_name(f'{directory.name}.tmp{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = dict(name=spec.name, documents=len(documents), bytes=sum(len(t.encode()) for t in texts),
                skipped=dict(budget.by_reason), tokenizer_sha256=tokenizer.sha256,
                train_tokens=_write_records(tmp / 'train.array_record', train),
                val_tokens=_write_records(tmp / 'val.array_record', val),
                split='documents' if len(documents) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT
                else 'document tails')
    (tmp / 'meta.json').write_text(json.dumps(meta, indent=1))
    if (directory / 'meta.json').exists():  # another process published the same entry
        shutil.rmtree(tmp)
    else:
        try:
            tmp.rename(directory)  # atomic: a crash mid-way leaves no half-written cache entry
        except OSError:  # published by another process in the meantime
            shutil.rmtree(tmp)
    if budget.skipped:
        log.warning('source %s: skipped %d malformed records %s', spec.name, budget.skipped,
                    dict(budget.by_reason))
    log.info('tokenized source %s: %d documents, %d train / %d val tokens', spec.name,
             meta['documents'], meta['train_tokens'], meta['val_tokens'])
    return TokenizedSource(spec, directory, meta)


def split_train_val(documents: list[list[int]], val_fraction: float,
                    seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Holds out `val_fraction` of the documents (at least one), chosen by `seed`; with fewer
    than `MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT` documents, the last `val_fraction` of every document's
    tokens instead (the held-out tail starts with <|endoftext|> like a document)."""
    if len(documents) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
        order = np.random.default_rng(seed).permutation(len(documents))
        n_val = max(1, round(val_fraction * len(documents)))
        held_out = set(order[:n_val].tolist())
        return ([d for i, d in enumerate(documents) if i not in held_out],
                [d for i, d in enumerate(documents) if i in held_out])
    train, val = [], []
    for doc in documents:
        cut = len(doc) - max(1, math.ceil(val_fraction * (len(doc) - 1)))
        train.append(doc[:cut])
        val.append([doc[0], *doc[cut:]])
    return train, val


def _write_records(path: pathlib.Path, documents: list[list[int]]) -> int:
    writer = ArrayRecordWriter(str(path), 'group_size:1')
    total = 0
    for doc in documents:
        for start in range(0, len(doc), RECORD_TOKENS):
            writer.write(np.asarray(doc[start:start + RECORD_TOKENS], np.int32).tobytes())
        total += len(doc)
    writer.close()
    return total


# --- rows and batches ---------------------------------------------------------------------------
def _decode_record(record: bytes) -> dict[str, np.ndarray]:
    return {'tokens': np.frombuffer(record, np.int32)}


class _TagSource:
    """Adds the source index to every row (picklable, unlike a lambda)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, row: dict) -> dict:
        return {**row, 'source': np.int32(self.index)}


def source_rows(path: str, seq_len: int, *, seed: int, index: int = 0,
                shuffle: bool = True) -> grain.IterDataset:
    """Rows of `seq_len + 1` tokens from one source's records."""
    records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path]))
    if shuffle:
        records = records.shuffle(seed=seed).repeat()  # a new order every epoch
    documents = records.map(_decode_record).to_iter_dataset()
    rows = grain.experimental.ConcatThenSplitIterDataset(
        documents, length_struct={'tokens': seq_len + 1})
    return rows.map(_TagSource(index))


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`[B, T+1]` packed rows -> the `[B, T]` model batch (see module docstring)."""
    tokens, segment_ids = rows['tokens'], rows['tokens_segment_ids']
    same_document = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids[:, :-1],
                positions=rows['tokens_positions'][:, :-1],
                loss_mask=same_document.astype(np.int32))


def make_train_dataset(sources: list[TokenizedSource], seq_len: int, batch_size: int, *,
                       seed: int, process_index: int = 0, process_count: int = 1,
                       keep_source: bool = False) -> grain.IterDataset:
    """The infinite training stream of this process's `batch_size` rows per batch.

    Args:
        sources: tokenized sources; their `spec.weight`s are normalised to token shares.
        process_index, process_count: this process's rows of each global batch (see
            `process_rows`).
        keep_source: also return each row's source index as `source` (for inspection).
    """
    streams = [source_rows(s.train_path, seq_len, seed=seed + i, index=i)
               for i, s in enumerate(sources)]
    weights = [s.spec.weight for s in sources]
    mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
    batches = process_rows(mixed, batch_size, process_index, process_count)
    return batches if keep_source else batches.map(to_model_batch)


class _Slice:
    """Rows `start:start + size` of every array of a batch (picklable)."""

    def __init__(self, start: int, size: int):
        self.start, self.size = start, size

    def __call__(self, batch: dict) -> dict:
        return {k: v[self.start:self.start + self.size] for k, v in batch.items()}


def process_rows(rows: grain.IterDataset, batch_size: int, process_index: int,
                 process_count: int) -> grain.IterDataset:
    """Batches of `batch_size` rows: this process's part of global batches of
    `batch_size * process_count` rows.

    Every process reads the same global stream and keeps its own slice of each batch, so the
    global batches, and with them the losses, do not depend on how many processes share the
    run, and a checkpoint resumes on any number of processes. Reading the whole stream costs a
    host only the global batch's tokens (a few MB/s at pod scale), far below its I/O budget."""
    batches = rows.batch(batch_size * process_count, drop_remainder=True)
    if process_count == 1:
        return batches
    return batches.map(_Slice(process_index * batch_size, batch_size))


def make_eval_batches(source: TokenizedSource, seq_len: int, batch_size: int, *,
                      max_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """This process's share of a source's validation rows, in order, as padded batches.

    Every process gets the same number of batches (rows are dealt round-robin and the last batch
    is padded with empty rows, whose loss mask is 0). At most `max_batches` batches are kept.
    """
    rows = list(source_rows(source.val_path, seq_len, seed=0, shuffle=False))
    return deal_eval_rows(rows, batch_size, to_model_batch, max_batches=max_batches,
                          process_index=process_index, process_count=process_count)


def deal_eval_rows(rows: list[dict], batch_size: int, to_batch, *, max_batches: int,
                   process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
    """Deals packed rows round-robin to processes as `batch_size`-row batches, padding the last
    with empty rows (segment 0, so loss mask 0): every process gets the same number of batches,
    at most `max_batches`."""
    global_batch = batch_size * process_count
    n_batches = min(max_batches, math.ceil(len(rows) / global_batch))
    rows = rows[:n_batches * global_batch][process_index::process_count]
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows += [empty] * (n_batches * batch_size - len(rows))
    keys = [k for k in rows[0] if k != 'source']
    return [to_batch({k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in keys})
            for i in range(0, len(rows), batch_size)]


def read_tokens(path: str) -> np.ndarray:
    """Every token of a cached ArrayRecord file (`train_path`, `val_path`), in order."""
    return np.concatenate([np.frombuffer(record, np.int32)
                           for record in grain.sources.ArrayRecordDataSource([path])])


def unigram_entropy(sources: list[TokenizedSource], vocab_size: int) -> float:
    """Entropy (nats per token) of the mixture's unigram token distribution: the loss of the
    best model that ignores context, a baseline any language model must beat."""
    weights = np.asarray([s.spec.weight for s in sources], np.float64)
    mixture = np.zeros(vocab_size, np.float64)
    for weight, source in zip(weights / weights.sum(), sources, strict=True):
        counts = np.zeros(vocab_size, np.int64)
        for record in grain.sources.ArrayRecordDataSource([source.train_path]):
            counts += np.bincount(np.frombuffer(record, np.int32), minlength=vocab_size)
        mixture += weight * counts / counts.sum()
    p = mixture[mixture > 0]
    return float(-(p * np.log(p)).sum())
