"""Stage 0: train the tokenizer on the corpus mixture and report on it.

Also used by later stages through `obtain`, which loads the configured tokenizer, the one already
in the workdir (a resumed run), or trains one into the workdir.
"""

from __future__ import annotations

import logging
import pathlib
import time

import jax

from gptstack import report, sharding
from gptstack.data import sources
from gptstack.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)
MODEL_FILE = 'tokenizer.model'


def train_from_config(config) -> tuple[Tokenizer, dict]:
    """Trains on every document of `config.data.sources`.

    Returns the tokenizer and stats, including `documents`: {source name: [texts]}.
    """
    budget = sources.SkipBudget(config.data.max_skips)
    start = time.perf_counter()
    documents = {spec.name: list(sources.read_source(spec, budget))
                 for spec in sources.specs_from_config(config.data.sources)}
    read_time = time.perf_counter() - start
    tokenizer = train_tokenizer((d for docs in documents.values() for d in docs),
                                config.tokenizer.vocab_size,
                                max_lines=config.tokenizer.max_lines, seed=config.seed)
    stats = dict(documents=documents, read_seconds=read_time,
                 train_seconds=time.perf_counter() - start - read_time,
                 skipped=dict(budget.by_reason))
    return tokenizer, stats


def obtain(config, workdir: pathlib.Path) -> Tokenizer:
    """The tokenizer a stage runs with, copied into its workdir so the lineage is on disk."""
    target = workdir / MODEL_FILE
    if config.tokenizer.path:
        tokenizer = Tokenizer.load(config.tokenizer.path)
        if target.exists() and Tokenizer.load(target).sha256 != tokenizer.sha256:
            raise ValueError(f'tokenizer.path={config.tokenizer.path} differs from {target}, '
                             'which this workdir was trained with; use a new workdir')
    elif target.exists():
        return Tokenizer.load(target)
    elif jax.process_count() > 1:  # process 0 trains it; the others read it from the workdir
        if jax.process_index() == 0:
            train_from_config(config)[0].save(target)
        sharding.barrier('tokenizer trained')
        return Tokenizer.load(target)
    else:
        tokenizer, stats = train_from_config(config)
        log.info('trained a %d-token tokenizer in %.1f s', tokenizer.vocab_size,
                 stats['train_seconds'])
    if jax.process_index() == 0:
        tokenizer.save(target)
    sharding.barrier('tokenizer saved')
    return tokenizer


def run(config, workdir: pathlib.Path) -> str:
    tokenizer, stats = train_from_config(config)
    tokenizer.save(workdir / MODEL_FILE)
    rows = []
    for name, docs in stats['documents'].items():
        sample = docs[:: max(1, len(docs) // 50)]
        n_bytes = sum(len(d.encode()) for d in sample)
        n_tokens = sum(map(len, tokenizer.encode_batch(sample)))
        rows.append((name, len(docs), n_bytes / max(n_tokens, 1)))
    example = 'def greet(name):\n    return f"Hello, {name}!"  # The end.'
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode(example)]
    report.write(workdir, 'Tokenizer', [
        ('Summary', report.table(['what', 'value'], [
            ('vocabulary', tokenizer.vocab_size), ('sha256', tokenizer.sha256),
            ('documents', sum(map(len, stats['documents'].values()))),
            ('training seconds', stats['train_seconds']),
            ('special tokens', ' '.join(f'`{t}`={tokenizer.special_ids[t]}'
                                        for t in SPECIAL_TOKENS)),
            ('malformed records skipped', stats['skipped'] or 0)])),
        ('Compression', report.table(['source', 'documents', 'bytes per token'], rows)),
        ('Example', report.code_block(f'{example}\n\n{pieces}\n\n{len(pieces)} tokens, '
                                      f'{len(example.encode())} bytes')),
    ])
    log.info('tokenizer: %d tokens, bytes/token %s; saved %s', tokenizer.vocab_size,
             {r[0]: round(r[2], 2) for r in rows}, workdir / MODEL_FILE)
    return 'finished'
