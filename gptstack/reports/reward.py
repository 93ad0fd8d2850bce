"""The reward-model report: held-out accuracy, loss and agreement with the gold scorer, the
simulated labeler's statistics, calibration and reward histograms, and best-of-N."""

from __future__ import annotations

import math

import numpy as np

from gptstack import report
from gptstack.evals import overoptimization
from gptstack.evals.ranking import calibration, pair_table
from gptstack.metrics import read_metrics


def kept_evaluation(records: list[dict], kept_step: int | None) -> dict:
    """The held-out evaluation of the checkpoint that later stages take (`kept_step`, the
    checkpointer's best step); {} if there is none."""
    return next((r for r in records if r['step'] == kept_step and 'val_accuracy' in r), {})


def write(workdir, config, labeler, train_stats, val_stats, rewards, ranks, valid,
          best_of, kept_step: int | None = None) -> str:
    records = read_metrics(workdir)
    evals = [r for r in records if 'val_accuracy' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    kept = kept_evaluation(records, kept_step)
    predicted, observed, counts = calibration(rewards, ranks, valid)
    pairs = pair_table(rewards, ranks, valid)
    plots = [
        report.plot(records, {'train': 'loss', 'validation': 'val_loss'}, workdir / 'loss.png',
                    title='Ranking loss', ylabel='nats per prompt'),
        report.plot(records, {'train (batch)': 'accuracy', 'validation': 'val_accuracy',
                              'gold agreement (validation)': 'gold_agreement'},
                    workdir / 'accuracy.png', title='Pairwise accuracy', ylabel='fraction'),
        report.calibration_plot(predicted, observed, counts, workdir / 'calibration.png',
                                title='Reward model calibration (held-out pairs)',
                                xlabel='predicted P(first wins) = sigmoid(r1 - r2)'),
        report.histogram({'preferred completion': pairs['better'],
                          'other completion': pairs['worse']}, workdir / 'rewards.png',
                         title='Held-out rewards', xlabel='reward'),
    ]
    summary = [
        ('initialised from', config.init_from),
        ('train comparisons', f'{train_stats.groups} prompts, {train_stats.pairs} pairs '
                              f'({train_stats.all_tied} all-tied left out, '
                              f'{train_stats.truncated} cut to fit a row)'),
        ('held-out comparisons', f'{val_stats.groups} prompts, {val_stats.pairs} pairs'),
        ('steps', last.get('step', 'n/a')),
        ('checkpoint kept for PPO and the comparison',
         f'step {kept_step} (the lowest held-out loss)' if kept_step is not None else 'n/a'),
        ('held-out accuracy: untrained head → kept checkpoint',
         f'{first.get("val_accuracy", math.nan):.3f} → {kept.get("val_accuracy", math.nan):.3f}'
         f' ± {kept.get("val_accuracy_stderr", math.nan):.3f}'),
        ('held-out loss: untrained head → kept checkpoint',
         f'{first.get("val_loss", math.nan):.4f} → {kept.get("val_loss", math.nan):.4f}'),
    ]
    if kept and kept is not last:
        summary.append(('the last evaluation (held-out accuracy, loss)',
                        f'step {last["step"]}: {last["val_accuracy"]:.3f}, '
                        f'{last.get("val_loss", math.nan):.4f}'))
    if 'gold_agreement' in kept:
        summary.append(('agreement with the gold scorer at the kept checkpoint (held-out pairs '
                        'of different gold)',
                        f'{kept["gold_agreement"]:.3f} ± {kept["gold_agreement_stderr"]:.3f}'))
    sections = [('Summary', report.table(['', ''], summary))]
    if labeler:
        rows = [(split, s.get('sampled_prompts', s['groups']), s['groups'],
                 f'{s["all_tied"]} ({s["all_tied"] / max(s["groups"], 1):.0%})', s['pairs'],
                 f'{s["labeler_agrees"] / max(s["gold_pairs"], 1):.3f}')
                for split, s in labeler.items() if isinstance(s, dict)]
        sections.append((f'Simulated labeler (Bradley-Terry noise {labeler["noise"]} on the gold '
                         'score)', report.table(
                             ['split', 'prompts sampled', 'groups kept', 'all tied',
                              'ranked pairs', 'labeler agrees with gold'], rows)))
    if best_of:
        plots.append(report.plot(
            [{'step': n, 'rm': v['rm'], 'oracle': v['oracle']} for n, v in best_of.items()],
            {'picked by the reward model': 'rm', 'picked by the gold scorer (ceiling)': 'oracle'},
            workdir / 'best_of_n.png', title='Best-of-N gold score (held-out prompts)',
            ylabel='mean gold score', xlabel='N (samples per prompt)', logx=True))
        sections.append((
            f'Best-of-N with the SFT policy (gold score on {config.best_of_n.prompts} held-out '
            'prompts; the gain over N = 1 is paired by prompt)',
            report.table(['N', 'KL', 'picked by the RM', '± se', 'gain over N = 1', '± se',
                          'gain over N / 2', '± se', 'RM score of its pick',
                          'picked by gold (ceiling)'],
                         [(n, v['kl'], v['rm'], v['rm_stderr'], v['gain'], v['gain_stderr'],
                           v.get('step_gain', ''), v.get('step_gain_stderr', ''), v['proxy'],
                           v['oracle']) for n, v in best_of.items()])
            + '\n\n' + over_optimisation(workdir, best_of)))
    sections.append(('Curves and calibration', '\n\n'.join(f'![{p}]({p})' for p in plots)))
    return report.write(workdir, 'Reward model report', sections)


def over_optimisation(workdir, best_of: dict[int, dict]) -> str:
    """Gold and proxy gains of best-of-N against `d = sqrt(KL)`, with Gao et al.'s fitted
    form `d (alpha - beta d)` and where the gold gain peaks; a plot and the fits."""
    d = np.sqrt([v['kl'] for v in best_of.values()])
    gold = np.asarray([v['rm'] for v in best_of.values()]) - best_of[1]['rm']
    proxy = np.asarray([v['proxy'] for v in best_of.values()]) - best_of[1]['proxy']
    records = [{'step': float(x), 'gold': float(g), 'proxy': float(r)}
               for x, g, r in zip(d, gold, proxy, strict=True)]
    plot = report.panels([
        dict(records=records, series={'gold score': 'gold'}, title='gold',
             ylabel='gain over N = 1', xlabel='sqrt(KL)'),
        dict(records=records, series={'reward-model score': 'proxy'}, title='proxy',
             ylabel='gain over N = 1', xlabel='sqrt(KL)'),
    ], workdir / 'best_of_n_overoptimisation.png', title='Best-of-N against sqrt(KL)')
    if (d > 0).sum() < 2:
        return f'![{plot}]({plot})\n\nToo few N above 1 to fit the functional forms.'
    fits = [(name, overoptimization.fit('bon', d, gain).describe())
            for name, gain in (('gold score', gold), ('reward-model score', proxy))]
    return (f'![{plot}]({plot})\n\n' + report.table(
        ['gain over N = 1', 'least-squares fit, d = sqrt(KL) (Gao et al. 2022)'], fits))
