"""The SFT report: what it trained on, the validation loss on assistant tokens and the gold
score of the base and finetuned models on held-out prompts (overall and by task level), curves,
and greedy answers."""

from __future__ import annotations

import math

from gptstack import report
from gptstack.metrics import read_metrics


def write(workdir, config, train_stats, n_train, n_val) -> str:
    records = read_metrics(workdir)
    evals = [r for r in records if 'val_loss' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    rows = [(name, first.get(f'gold/{name}', 'n/a'), first.get(f'gold/{name}_stderr', 'n/a'),
             last.get(f'gold/{name}', 'n/a'), last.get(f'gold/{name}_stderr', 'n/a'))
            for name in ('greedy', 'sampled')]
    by_level = report.levels_before_after(first, last)
    plots = [
        report.plot(records, {'train (assistant tokens)': 'loss', 'validation': 'val_loss'},
                    workdir / 'loss.png', title='SFT loss', ylabel='nats per token'),
        report.plot(records, {'greedy': 'gold/greedy', 'sampled': 'gold/sampled'},
                    workdir / 'gold.png', title='Gold score on held-out tasks',
                    ylabel='mean gold score'),
    ]
    samples_path = workdir / 'samples.jsonl'
    samples = samples_path.read_text().splitlines()[-4:] if samples_path.exists() else []
    return report.write(workdir, 'Supervised finetuning report', [
        ('Summary', report.table(['', ''], [
            ('initialised from', config.init_from),
            ('train conversations', f'{n_train} ({train_stats.assistant_tokens:,} assistant '
                                    f'tokens, {train_stats.truncated} truncated)'),
            ('validation conversations', n_val),
            ('steps', last.get('step', 'n/a')),
            ('validation loss (assistant tokens): base → SFT',
             f'{first.get("val_loss", math.nan):.4g} → {last.get("val_loss", math.nan):.4g}'),
        ])),
        ('Gold score on held-out prompts (mean ± standard error)', report.table(
            ['decoding', 'base', '± se', 'SFT', '± se'], rows)),
        ('Gold score by task level', report.table(
            ['level', 'base, greedy', 'SFT, greedy', 'base, sampled', 'SFT, sampled'],
            by_level) if by_level else 'no held-out tasks'),
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        ('Greedy answers at the last evaluation', report.code_block('\n'.join(samples))),
    ])
