"""The tokenizer report: vocabulary, special tokens, compression per source and an example."""

from __future__ import annotations

from gptstack import report
from gptstack.data.tokenizer import SPECIAL_TOKENS, Tokenizer


def write(workdir, tokenizer: Tokenizer, stats: dict) -> list[tuple]:
    """Writes the report; returns the compression rows `(source, documents, bytes per token)`."""
    rows = []
    for name, docs in stats['documents'].items():
        sample = docs[:: max(1, len(docs) // 50)]
        n_bytes = sum(len(d.encode()) for d in sample)
        n_tokens = sum(map(len, tokenizer.encode_batch(sample)))
        rows.append((name, len(docs), n_bytes / max(n_tokens, 1)))
    example = 'def greet(name):\n    return f"Hello, {name}!"  # The end.'
    pieces = [tokenizer.piece(i) for i in tokenizer.encode(example)]
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
    return rows
