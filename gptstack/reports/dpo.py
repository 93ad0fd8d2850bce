"""The DPO report: what it trained on, the held-out comparisons' loss, implicit-reward accuracy
and margin, the policy's log-probabilities of preferred and other completions, and the gold score
of the SFT and DPO policies on held-out task prompts (overall and by level) with the DPO policy's
KL to the reference there, with curves."""

from __future__ import annotations

import json
import math

from gptstack import report
from gptstack.metrics import read_metrics


def write(workdir, config, train_stats, n_train, n_val) -> str:
    records = read_metrics(workdir)
    evals = [r for r in records if 'val_loss' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})

    def before_after(key, fmt='.4f'):
        return (f'{first.get(key, math.nan):{fmt}} → {last.get(key, math.nan):{fmt}}')

    def score(record, mode):
        if f'gold/{mode}' not in record:
            return 'n/a'
        return f'{record[f"gold/{mode}"]:.4f} ± {record[f"gold/{mode}_stderr"]:.4f}'

    loss = config.loss
    plots = [
        report.plot(records, {'train': 'loss', 'held-out': 'val_loss'}, workdir / 'loss.png',
                    title=f'DPO loss ({loss.kind})', ylabel='loss per comparison'),
        report.plot(records, {'train': 'accuracy', 'held-out': 'val_accuracy'},
                    workdir / 'accuracy.png', title='Implicit reward: pairwise accuracy',
                    ylabel='fraction of pairs', hlines={'chance': 0.5}),
        report.plot(records, {'preferred (train)': 'chosen_logp',
                              'other (train)': 'rejected_logp',
                              'preferred (held-out)': 'val_chosen_logp',
                              'other (held-out)': 'val_rejected_logp'},
                    workdir / 'log_probs.png', title='Log-probability of the completions',
                    ylabel='nats per completion'),
    ]
    if any('gold/sampled' in r for r in records):  # eval.gold_prompts > 0
        plots.append(report.plot(records, {'greedy': 'gold/greedy', 'sampled': 'gold/sampled'},
                                 workdir / 'gold.png', title='Gold score on held-out task prompts',
                                 ylabel='mean gold score'))
    by_level = report.levels_before_after(first, last, ('sampled', 'greedy'))
    rows = [(r['step'], r.get('val_loss'), r.get('val_accuracy'), r.get('val_margin'),
             r.get('gold/sampled', ''), r.get('gold/greedy', ''), r.get('val/kl', ''))
            for r in evals]
    return report.write(workdir, 'DPO report', [
        ('Summary', report.table(['', ''], [
            ('policy and reference from', config.init_from),
            ('comparisons', f'{n_train:,} training groups ({train_stats.pairs:,} ranked pairs, '
                            f'{train_stats.all_tied:,} all-tied groups left out), {n_val:,} '
                            'held out'),
            ('loss', f'{loss.kind}, β {loss.beta:g}, label smoothing {loss.label_smoothing:g}, '
                     f'{loss.pairs} pairs'),
            ('steps', last.get('step', 'n/a')),
            ('held-out loss: SFT → DPO', before_after('val_loss')),
            ('held-out implicit-reward accuracy: SFT → DPO',
             f'{before_after("val_accuracy", ".3f")} (± '
             f'{last.get("val_accuracy_stderr", math.nan):.3f})'),
            ('held-out margin β h', before_after('val_margin')),
            ('held-out gold score, sampled: SFT → DPO',
             f'{score(first, "sampled")} → {score(last, "sampled")}'),
            ('held-out gold score, greedy: SFT → DPO',
             f'{score(first, "greedy")} → {score(last, "greedy")}'),
            ('KL to the reference on held-out prompts (nats per reply, sampled replies)',
             f'{last["val/kl"]:.4f} ± {last["val/kl_stderr"]:.4f}' if 'val/kl' in last
             else 'n/a'),
        ])),
        ('Held-out evaluations', report.table(
            ['step', 'loss', 'accuracy', 'margin', 'gold (sampled)', 'gold (greedy)',
             'KL to the reference'], rows)),
        ('Gold score by task level', report.table(
            ['level', 'SFT, sampled', 'DPO, sampled', 'SFT, greedy', 'DPO, greedy'],
            by_level) if by_level else 'no held-out tasks'),
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        ('Config', report.code_block(json.dumps(config.to_dict(), indent=1))),
    ])
