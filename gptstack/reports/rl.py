"""The RL stage's report (PPO, GRPO or RLOO): held-out gold and reward-model scores of the
SFT and trained policies with the paired gain, the KL coefficient really used, the evaluations
along training, by task family and level, and reward against KL."""

from __future__ import annotations

import json
import math

import numpy as np

from gptstack import report
from gptstack.data import tasks
from gptstack.evals import overoptimization
from gptstack.metrics import read_metrics


def kl_coefs(records, config) -> str:
    """The β the iterations used, as logged: its start and end under the adaptive controller,
    else each value with its steps (a resumed run may have changed `rl.ppo.kl_coef`)."""
    logged = [(r['step'], r['kl_coef']) for r in records if 'kl_coef' in r]
    if not logged:
        return 'n/a'
    if config.rl.ppo.target_kl > 0:
        return (f'{logged[0][1]:.4g} → {logged[-1][1]:.4g} (adapted toward a KL of '
                f'{config.rl.ppo.target_kl:g} nats per response)')
    spans = []
    for step, value in logged:
        if spans and f'{value:.4g}' == spans[-1][0]:
            spans[-1][2] = step
        else:
            spans.append([f'{value:.4g}', step, step])
    if len(spans) == 1:
        return spans[0][0]
    return ', '.join(f'{v} (steps {a}–{b})' if a < b else f'{v} (step {a})'
                     for v, a, b in spans)


def write(workdir, config) -> str:
    name = config.rl.get('algorithm', 'ppo').upper()
    records = read_metrics(workdir)
    evals = [r for r in records if 'val/kl' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})

    def score(record, mode):
        if f'gold/{mode}' not in record:
            return 'n/a'
        return f'{record[f"gold/{mode}"]:.4f} ± {record[f"gold/{mode}_stderr"]:.4f}'

    def gain(record, mode):
        if f'gold/{mode}_gain' not in record:
            return 'n/a'
        mean, stderr = record[f'gold/{mode}_gain'], record[f'gold/{mode}_gain_stderr']
        return f'{mean:+.4f} ± {stderr:.4f} ({mean / max(stderr, 1e-12):.1f} standard errors)'

    plots = [
        report.plot(records, {'reward-model score (train rollouts)': 'rm_score',
                              'gold score (train rollouts)': 'gold'}, workdir / 'reward.png',
                    title=f'Rewards during {name}', ylabel='mean per response'),
        report.plot(records, {'KL to the SFT model (train rollouts)': 'kl'}, workdir / 'kl.png',
                    title='KL per response', ylabel='nats'),
        report.plot([{**r, 'step': r['val/kl']} for r in evals],
                    {'reward-model score': 'val/rm_score', 'gold score (sampled)':
                     'gold/sampled'}, workdir / 'reward_vs_kl.png',
                    title='Held-out reward against KL (over-optimisation)',
                    ylabel='mean per response', xlabel='KL to the SFT model (nats per response)'),
        report.plot(records, {'policy': 'policy_loss', 'value': 'value_loss'},
                    workdir / 'losses.png', title=f'{name} losses', ylabel='loss'),
    ]
    summary = [
        ('policy from', config.init_from), ('reward model from', config.reward_from),
        ('reward', 'reward model' if config.rl.reward == 'model' else 'gold scorer (verifiable)'),
        ('iterations × rollouts', f'{last.get("step", 0)} × {config.data.batch_size}'),
        ('KL coefficient β', kl_coefs(records, config)),
        ('algorithm', name),
        (f'held-out gold score, sampled ({config.eval.samples} per prompt): SFT → {name}',
         f'{score(first, "sampled")} → {score(last, "sampled")}'),
        ('gain over the SFT policy, sampled (paired over prompts)', gain(last, 'sampled')),
        (f'held-out gold score, greedy: SFT → {name}', f'{score(first, "greedy")} → '
                                                   f'{score(last, "greedy")}'),
        ('gain over the SFT policy, greedy (paired over prompts)', gain(last, 'greedy')),
        (f'held-out reward-model score: SFT → {name}',
         f'{first.get("val/rm_score", math.nan):.4f} → '
         f'{last.get("val/rm_score", math.nan):.4f}'),
        ('KL of the final policy to the SFT model (nats per response)',
         f'{last.get("val/kl", math.nan):.3f}'),
    ]
    rows = [(r['step'], r.get('val/kl'), r.get('val/rm_score'), r.get('gold/sampled'),
             gain(r, 'sampled') if r['step'] else '', r.get('gold/greedy'))
            for r in evals]
    families = [f for f in tasks.FAMILIES if f'gold/sampled/{f}' in first]
    family_rows = [(f, first[f'gold/sampled/{f}'], last.get(f'gold/sampled/{f}', math.nan))
                   for f in families]
    by_level = report.levels_before_after(first, last, ('sampled', 'greedy'))
    return report.write(workdir, f'{name} report', [
        ('Summary', report.table(['', ''], summary)),
        ('Held-out evaluations', report.table(
            ['step', 'KL', 'reward-model score', 'gold (sampled)', 'gain over SFT (paired)',
             'gold (greedy)'], rows)),
        ('Held-out gold score by task family (sampled)', report.table(
            ['family', 'SFT', name], family_rows) if family_rows else 'no gold scorer'),
        ('Held-out gold score by task level', report.table(
            ['level', 'SFT, sampled', f'{name}, sampled', 'SFT, greedy', f'{name}, greedy'],
            by_level) if by_level else 'no task prompts'),
        ('Over-optimisation', over_optimisation(evals)),
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        ('Config', report.code_block(json.dumps(config.to_dict(), indent=1))),
    ])


def over_optimisation(evals: list[dict]) -> str:
    """Gao et al.'s RL form `d (alpha - beta ln d)`, `d = sqrt(KL)`, fitted to the held-out gold
    and reward-model gains over the SFT policy at the evaluations, and where each peaks."""
    points = [r for r in evals if 'gold/sampled' in r and 'val/rm_score' in r]
    if len(points) < 3 or points[0]['step'] != 0:
        return 'Too few held-out evaluations to fit the functional form (it takes three).'
    d = np.sqrt(np.maximum([r['val/kl'] for r in points], 0.0))
    fits = []
    for name, key in (('gold score (sampled)', 'gold/sampled'),
                      ('reward-model score', 'val/rm_score')):
        gain = np.asarray([r[key] for r in points]) - points[0][key]
        try:
            fits.append((name, overoptimization.fit('rl', d, gain).describe()))
        except ValueError as error:  # the policy never moved from the reference
            fits.append((name, str(error)))
    return report.table(['gain over SFT', 'least-squares fit, d = sqrt(KL) (Gao et al. 2022)'],
                        fits)
