"""The main job's report: the stages side by side (the talk's table), their curves, and the
comparison of the base, SFT, best-of-N, DPO and RL models on the same held-out prompts, overall,
by task family and by level, each with its KL to the SFT model and what its stage cost."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from gptstack import labeler, report
from gptstack.config import GPTConfig
from gptstack.evals import best_of_n, overoptimization
from gptstack.evals.comparison import MODEL_NAMES, MODELS
from gptstack.lineage import Workdir
from gptstack.loop import SPLIT
from gptstack.metrics import read_metrics
from gptstack.model import GPT, ScoreModel, count_params
from gptstack.reports import reward as reward_report
from gptstack.state import abstract_model

COMPARISON = 'comparison.json'
# The pipeline's RL runs (stage folders) and how the report names them, given the algorithm.
RL_RUNS = {'rl': '4 RL ({})', 'rl_small_beta': '4 {} at a small β',
           'rl_gold': '4 {} against the gold scorer', 'grpo': '4 {} against the gold scorer'}
# The stage each model of the comparison comes out of (best-of-N: the reward model's).
MODEL_STAGES = {'base': 'pretrain', 'sft': 'sft', 'best_of_n': 'reward', 'dpo': 'dpo',
                'ppo': 'rl', 'ppo_gold': 'rl_gold', 'grpo': 'grpo'}
# One line per held-out prompt of the comparison: its family, level and every model's scores.
PER_PROMPT = 'comparison_prompts.jsonl'


def algorithm(stage_config) -> str:
    """The RL algorithm of an RL stage's config as the report names it: PPO, GRPO or RLOO."""
    return stage_config.rl.get('algorithm', 'ppo').upper()


def model_names(config) -> dict[str, str]:
    """`MODEL_NAMES` with the RL models named by their runs' algorithm."""
    rl, gold, grpo = algorithm(config.rl), algorithm(config.rl_gold), algorithm(config.grpo)
    return {**MODEL_NAMES, 'ppo': MODEL_NAMES['ppo'].replace('PPO', rl),
            'ppo_gold': MODEL_NAMES['ppo_gold'].replace('PPO', gold),
            'grpo': MODEL_NAMES['grpo'].replace('GRPO', grpo)}


def _median(records: list[dict], key: str) -> float | str:
    values = [r[key] for r in records if key in r]
    return float(np.median(values)) if values else 'n/a'


def _last(records: list[dict], key: str) -> dict:
    return next((r for r in reversed(records) if key in r), {})


def _steps(records: list[dict]) -> int:
    return max((r['step'] for r in records), default=0)


def _summed(records: list[dict], key: str) -> float:
    """The total over a run of a per-step quantity that each record logs as its mean over
    the steps since the record before."""
    total, previous = 0.0, 0
    for r in records:
        if key in r:
            total += r[key] * (r['step'] - previous)
            previous = r['step']
    return total


def time_split(workdir: pathlib.Path, stage: str, seconds: float, records: list[dict]) -> str:
    """Where a stage's wall time went, in minutes: its training steps (an RL stage's
    iterations as generation, scoring and update), evaluations, checkpoints, samples, waiting
    for data, the reward stage's sampling and labelling of its comparisons and its best-of-N,
    and the rest (loading, tokenizing, an RL stage's evaluation of the SFT policy, reports), as
    the stage's last checkpoint, metrics and labeler statistics record them."""
    meta = Workdir(workdir / stage).latest_meta()
    if 'time_spent' not in meta:
        return ''
    spent = meta['time_spent']
    steps = meta['wall_time'] - sum(spent.values())
    parts = {'steps': steps}
    rl_parts = {'generation': 'time/generate', 'scoring': 'time/score', 'update': 'time/update'}
    if any(key in r for r in records for key in rl_parts.values()):
        parts = {name: _summed(records, key) for name, key in rl_parts.items()}
    computing = list(parts)
    parts.update({part: spent[part] for part in SPLIT})
    # The reward stage's work outside its loop: sampling and labelling its comparisons, and
    # best-of-N with the trained model.
    labeler_stats = workdir / stage / 'comparisons' / labeler.STATS
    if labeler_stats.exists():
        stats = json.loads(labeler_stats.read_text())
        parts['comparisons'] = sum(s.get('seconds', 0.0) for s in stats.values()
                                   if isinstance(s, dict))
    parts['best-of-N'] = sum(r.get('time/best_of_n', 0.0) for r in records)
    parts['other'] = (seconds - meta['wall_time'] - parts.get('comparisons', 0.0)
                      - parts['best-of-N'])
    return ' · '.join(f'{name} {value / 60:.1f}' for name, value in parts.items()
                      if name in computing or value >= 0.05 * 60)  # no parts of 0.0


def comparison_row(config, comparison: dict, names: dict[str, str]) -> tuple:
    """The stage table's last row: the comparison's cost, model by model."""
    c = config.compare
    split = ' · '.join(f'{names.get(m, m)} {seconds / 60:.1f}'
                       for m, seconds in comparison.get('seconds_by_model', {}).items())
    return ('5 comparison', f'{comparison["prompts"]:,} held-out task prompts',
            f'{c.samples} samples (the base model {c.base_samples}) and a greedy reply per '
            'prompt and model', '', '',
            f'{comparison.get("seconds", 0.0) / 60:.1f}', split, '', '')


def stage_table(config, workdir: pathlib.Path, ledger: dict) -> list[tuple]:
    """The talk's table for this run: per stage, its data, what it trained on, the model and
    what it cost: wall time, where it went, tokens/s and MFU (medians of the logged values)."""
    def n_params(stage, cls):
        model_config = GPTConfig.from_dict(Workdir(workdir / stage).latest_meta()['model'])
        return count_params(abstract_model(lambda rngs: cls(model_config, rngs=rngs))[1])

    def minutes(stage):
        return f'{ledger[stage]["seconds"] / 60:.1f}'

    def cost(stage, records):
        return (minutes(stage), time_split(workdir, stage, ledger[stage]['seconds'], records),
                _median(records, 'tokens_per_sec'), _median(records, 'mfu'))

    def packed_tokens(data, steps):  # a language-model stage's steps x batch x sequence
        return (f'{steps * data.batch_size * data.seq_len:,} tokens '
                f'({steps} × {data.batch_size} × {data.seq_len})')

    rows = []
    pre, sft_c, rm = config.pretrain, config.sft, config.reward
    sources = ', '.join(f'{name} {spec.weight:g}' for name, spec in pre.data.sources.items())
    vocab = config.tokenizer.tokenizer.vocab_size
    rows.append(('0 tokenizer', f'mixture ({sources})', f'BPE, {vocab} tokens', '', '',
                 minutes('tokenizer'), '', '', ''))
    records = read_metrics(workdir / 'pretrain')
    steps = _steps(records)
    rows.append(('1 pretraining', f'mixture ({sources})', packed_tokens(pre.data, steps),
                 f'{n_params("pretrain", GPT):,}', f'lr {pre.optim.lr:g}',
                 *cost('pretrain', records)))
    records = read_metrics(workdir / 'sft')
    steps = _steps(records)
    rows.append(('2 SFT', f'{sft_c.data.train_tasks:,} task conversations',
                 packed_tokens(sft_c.data, steps), f'{n_params("sft", GPT):,}',
                 f'lr {sft_c.optim.lr:g}', *cost('sft', records)))
    records = read_metrics(workdir / 'reward')
    steps = _steps(records)
    rows.append(('3 reward model', f'{rm.data.train_prompts:,} prompts × '
                 f'{rm.data.completions} SFT samples, ranked',
                 f'{steps} steps × {rm.data.batch_size} rows of {rm.data.seq_len} tokens '
                 f'(median {_median(records, "prompts")} ranked groups a step)',
                 f'{n_params("reward", ScoreModel):,}',
                 f'lr {rm.optim.lr:g}', *cost('reward', records)))
    dpo = config.dpo
    records = read_metrics(workdir / 'dpo')
    steps = _steps(records)
    rows.append(('3-4 DPO', 'the reward stage\'s ranked comparisons',
                 f'{steps * dpo.data.batch_size:,} ranked groups ({steps} × '
                 f'{dpo.data.batch_size})', f'{n_params("dpo", GPT):,}',
                 f'lr {dpo.optim.lr:g}, β {dpo.loss.beta:g}', *cost('dpo', records)))
    for name, label in RL_RUNS.items():
        ppo = config[name]
        critic = ' + critic' if algorithm(ppo) == 'PPO' else ''
        records = read_metrics(workdir / name)
        steps = _steps(records)
        rows.append((label.format(algorithm(ppo)), f'{ppo.data.train_prompts:,} task prompts',
                     f'{steps * ppo.data.batch_size:,} rollouts ({steps} × '
                     f'{ppo.data.batch_size}, ≤ {ppo.data.max_new_tokens} new tokens)',
                     f'{n_params(name, GPT):,}{critic}',
                     f'lr {ppo.optim.lr:g}, β {ppo.rl.ppo.kl_coef:g}', *cost(name, records)))
    return rows


def intervals(sft: dict, ppo: dict, stderr: str = 'gold_stderr', name: str = 'PPO') -> str:
    """The SFT and RL (`name`) models' gold scores as `mean ± 2 se` intervals, and whether they
    overlap."""
    spans = [(m['gold'] - 2 * m[stderr], m['gold'] + 2 * m[stderr]) for m in (sft, ppo)]
    if spans[1][0] > spans[0][1]:
        verdict = f'{name} above SFT, not overlapping'
    elif spans[0][0] > spans[1][1]:
        verdict = f'{name} below SFT, not overlapping'
    else:
        verdict = 'overlapping'
    return ' vs '.join(f'[{a:.4f}, {b:.4f}]' for a, b in spans) + f' ({verdict})'


def level_rows(comparison: dict) -> list[tuple]:
    """Per task level, each model's sampled gold score `mean ± se` (the mean alone where the
    level holds too few prompts for an error)."""
    def cell(mean, stderr):
        return f'{mean:.4f}' if stderr is None else f'{mean:.4f} ± {stderr:.4f}'

    return [(f'level {level}', *(cell(scores[m], comparison['levels_stderr'][level][m])
                                 for m in MODELS))
            for level, scores in comparison.get('levels', {}).items()]


def best_of_n_rows(workdir: pathlib.Path) -> list[tuple]:
    """The reward stage's best-of-N gains (paired over its held-out prompts) for the summary."""
    path = workdir / 'reward' / best_of_n.CURVE_FILE
    if not path.exists():
        return []
    curve = best_of_n.read_curve(path)
    rows = []
    for n, p in curve.items():
        if 'step_gain' not in p:
            continue
        gain = f'{p["gain"]:+.4f} ± {p["gain_stderr"]:.4f}'
        if n == 2:  # over N = 1 is over N / 2
            rows.append(('best-of-2: gain over N = 1 (reward stage, paired)', gain))
        else:
            rows.append((f'best-of-{n}: gain over N = 1, over N = {n // 2} (reward stage, '
                         'paired)', f'{gain}, {p["step_gain"]:+.4f} ± '
                                    f'{p["step_gain_stderr"]:.4f}'))
    return rows


def over_optimisation_runs(config, workdir: pathlib.Path) -> dict[str, tuple]:
    """`{run: (form, d, gold gain, proxy gain)}`: best-of-N's points over N (the reward stage's
    curve) and each RL run's held-out evaluations, as gains over the SFT policy against
    `d = sqrt(KL)` from it (the proxy is the reward model's score)."""
    runs = {}
    curve_path = workdir / 'reward' / best_of_n.CURVE_FILE
    if curve_path.exists():
        curve = list(best_of_n.read_curve(curve_path).values())
        runs['best-of-N'] = ('bon', np.sqrt([p['kl'] for p in curve]),
                             np.asarray([p['rm'] - curve[0]['rm'] for p in curve]),
                             np.asarray([p['proxy'] - curve[0]['proxy'] for p in curve]))
    for name in RL_RUNS:
        evals = [r for r in read_metrics(workdir / name)
                 if 'val/kl' in r and 'gold/sampled' in r]
        if not evals or evals[0]['step'] != 0:
            continue
        ppo = config[name].rl
        label = (f'{algorithm(config[name])}, β {ppo.ppo.kl_coef:g}'
                 + (', gold reward' if ppo.reward == 'gold' else ''))
        runs[label] = ('rl', np.sqrt(np.maximum([r['val/kl'] for r in evals], 0.0)),
                       np.asarray([r['gold/sampled'] - evals[0]['gold/sampled'] for r in evals]),
                       np.asarray([r['val/rm_score'] - evals[0]['val/rm_score'] for r in evals]))
    return runs


def over_optimisation(config, workdir: pathlib.Path) -> str:
    """Gold and proxy gains against `d = sqrt(KL)` for best-of-N and every RL run in one
    figure, and Gao et al.'s forms fitted to each with the KL where the fitted gain peaks."""
    runs = over_optimisation_runs(config, workdir)
    if not runs:
        return 'No best-of-N curve or RL evaluations to draw.'
    panels = []
    for score, index in (('gold', 2), ('proxy', 3)):
        records = [{'step': float(x), label: float(y)} for label, run in runs.items()
                   for x, y in zip(run[1], run[index], strict=True)]
        panels.append(dict(records=records, series={label: label for label in runs},
                           title=f'{score} score' if score == 'gold' else 'reward-model score',
                           ylabel='gain over the SFT policy', xlabel='sqrt(KL to SFT)'))
    plot = report.panels(panels, workdir / 'overoptimisation.png',
                         title='Over-optimisation: gains against the distance from SFT')
    rows = []
    for label, (form, d, gold, proxy) in runs.items():
        for score, gain in (('gold', gold), ('reward model', proxy)):
            try:
                described = overoptimization.fit(form, d, gain).describe()
            except ValueError as error:  # the policy never moved from the SFT model
                described = str(error)
            rows.append((label, score, f'{float(gain[np.argmax(gain)]):+.4f} at KL '
                                       f'{float(d[np.argmax(gain)]) ** 2:.3g}', described))
    return (f'![{plot}]({plot})\n\n' + report.table(
        ['run', 'score', 'largest gain measured', 'least-squares fit, d = sqrt(KL) (Gao, '
         'Schulman & Hilton 2022)'], rows) + '\n\nBest-of-N is fitted with d (α − β d), the RL '
        'runs with d (α − β ln d). Over-optimisation shows where the reward model\'s score keeps '
        'rising while the gold score has peaked: compare the small β with the default one, and '
        'both with the run against the gold scorer itself.')


def kl_cell(entry: dict) -> str:
    """A model's KL to the SFT model as the gold table shows it."""
    if 'kl' not in entry:
        return ''
    if 'kl_stderr' not in entry:
        return f'{entry["kl"]:.3f} (analytic)'
    return f'{entry["kl"]:.3f} ± {entry["kl_stderr"]:.3f}'


def model_cost(workdir: pathlib.Path, model: str, ledger: dict) -> tuple:
    """`(wall time in minutes, median tokens/s, peak memory in GiB)` of the stage that made
    `model`, blank where the run did not record them."""
    stage = MODEL_STAGES[model]
    entry = ledger.get(stage, {})
    speed = _median(read_metrics(workdir / stage), 'tokens_per_sec')
    peak = entry.get('peak_memory_gib')
    return (f'{entry["seconds"] / 60:.1f}' if 'seconds' in entry else '',
            f'{speed:,.0f}' if isinstance(speed, float) else '',
            f'{peak:.2f}' if peak is not None else '')


def write(config, workdir: pathlib.Path, ledger: dict, comparison: dict) -> str:
    models = comparison['models']
    names, rl = model_names(config), algorithm(config.rl)
    gold_rows = []
    for model in MODELS:
        entry = models[model]
        gain = entry.get('gain')
        gold_rows.append((
            names[model], f'{entry["gold"]:.4f} ± {entry["gold_stderr"]:.4f}',
            f'{entry["greedy"]:.4f} ± {entry["greedy_stderr"]:.4f}' if 'greedy' in entry else '',
            f'{gain["mean"]:+.4f} ± {gain["stderr"]:.4f} (over {names[gain["over"]]})'
            if gain else '', kl_cell(entry), *model_cost(workdir, model, ledger),
            entry.get('distinct_replies', ''), entry.get('distinct_bigrams', '')))
    contrast_rows = [(f'{names[c["model"]]} over {names[c["over"]]}',
                      f'{c["mean"]:+.4f} ± {c["stderr"]:.4f}',
                      f'{c["mean"] / max(c["stderr"], 1e-12):.1f}')
                     for c in comparison.get('contrasts', [])]
    family_rows = [(family, *(scores[m] for m in MODELS))
                   for family, scores in comparison['families'].items()]
    gold_plot = report.bars({names[m]: models[m]['gold'] for m in MODELS},
                            {names[m]: 2 * models[m]['gold_stderr'] for m in MODELS},
                            workdir / 'gold.png',
                            title='Held-out gold score (± 2 standard errors, stratified)',
                            ylabel='mean gold score')
    pre, sft_r, rm_r, rl_r = (read_metrics(workdir / stage)
                              for stage in ('pretrain', 'sft', 'reward', 'rl'))
    stages_plot = report.panels([
        dict(records=pre, series={'train': 'loss', 'validation': 'val_loss'},
             title='1 pretraining', ylabel='loss (nats per token)'),
        dict(records=sft_r, series={'train': 'loss', 'validation': 'val_loss'},
             title='2 SFT (assistant tokens)', ylabel='loss (nats per token)'),
        dict(records=rm_r, series={'train': 'loss', 'validation': 'val_loss'},
             title='3 reward model', ylabel='ranking loss'),
        dict(records=rl_r, series={'reward-model score': 'rm_score', 'KL to SFT': 'kl'},
             title=f'4 {rl} (train rollouts)', ylabel='per response'),
    ], workdir / 'stages.png', title='The four stages')
    rm_eval = reward_report.kept_evaluation(rm_r, Workdir(workdir / 'reward').best_step())
    rl_eval = _last(rl_r, 'val/kl')
    def gain(entry):
        g = entry['gain']
        return (f'{g["mean"]:+.4f} ± {g["stderr"]:.4f} '
                f'({g["mean"] / max(g["stderr"], 1e-12):.1f} standard errors)')

    stage_seconds = sum(v['seconds'] for v in ledger.values())
    compare_seconds = comparison.get('seconds', 0.0)
    headline = [
        ('held-out task prompts', f'{comparison["prompts"]} (test split), {comparison["samples"]} '
                                  'samples each at temperature 1 (the base model '
                                  f'{comparison.get("base_samples", comparison["samples"])}), '
                                  'plus one greedy reply'),
        ('gold score (sampled): ' + ' · '.join(names[m] for m in MODELS),
         ' · '.join(f'{models[m]["gold"]:.3f}' for m in MODELS)),
        (f'{rl} over SFT (paired over prompts)', gain(models['ppo'])),
        (f'{algorithm(config.rl_gold)} against the gold scorer over SFT: the ceiling',
         gain(models['ppo_gold'])),
        ('DPO over SFT (on the reward stage\'s comparisons)', gain(models['dpo'])),
        (f'{names["grpo"]} over SFT', gain(models['grpo'])),
        *((f'{names[c["model"]]} over {names[c["over"]]}',
           f'{c["mean"]:+.4f} ± {c["stderr"]:.4f} '
           f'({c["mean"] / max(c["stderr"], 1e-12):.1f} standard errors)')
          for c in comparison.get('contrasts', []) if c['model'] == 'grpo' and c['over'] == 'ppo'),
        (f'SFT and {rl} gold score, ± 2 standard errors',
         intervals(models['sft'], models['ppo'], name=rl)),
        ('the same, standard errors not stratified',
         intervals(models['sft'], models['ppo'], 'gold_stderr_unstratified', rl)),
        ('reward model: held-out pairwise accuracy (the kept checkpoint)',
         f'{rm_eval.get("val_accuracy", math.nan):.3f} ± '
         f'{rm_eval.get("val_accuracy_stderr", math.nan):.3f} (agreement with the gold scorer '
         f'{rm_eval.get("gold_agreement", math.nan):.3f})'),
        (f'KL of the final {rl} policy to the SFT model',
         f'{rl_eval.get("val/kl", math.nan):.3f} nats per response'),
        ('KL to the SFT model on the comparison\'s prompts: ' + ', '.join(
            names[m] for m in MODELS if 'kl_stderr' in models[m] and m != 'sft'),
         ', '.join(f'{models[m]["kl"]:.3f}' for m in MODELS
                   if 'kl_stderr' in models[m] and m != 'sft') + ' nats per reply'),
        *best_of_n_rows(workdir),
        ('wall time', f'{(stage_seconds + compare_seconds) / 60:.1f} min (the comparison '
                      f'{compare_seconds / 60:.1f} min)'),
    ]
    examples = '\n\n'.join(report.code_block(
        f'prompt: {e["prompt"]}\nexpected: {e["answer"]}\n' + '\n'.join(
            f'{names[m]:>22}: {e[m]!r}' for m in MODELS)) for e in comparison['examples'])
    links = ('Stage reports: [tokenizer](tokenizer/report.md), [pretraining](pretrain/report.md), '
             f'[SFT](sft/report.md), [reward model](reward/report.md), [DPO](dpo/report.md), '
             f'[{rl}](rl/report.md), [{names["grpo"]}](grpo/report.md).')
    return report.write(workdir, 'gptstack pipeline report', [
        ('Summary', report.table(['', ''], headline)),
        ('The stages', report.table(
            ['stage', 'data', 'trained on', 'parameters', 'optimiser', 'wall time (min)',
             'of which (min)', 'tokens/s', 'MFU'],
            [*stage_table(config, workdir, ledger), comparison_row(config, comparison, names)])
         + f'\n\n![{stages_plot}]({stages_plot})\n\n{links}'),
        ('Gold score on the same held-out prompts', report.table(
            ['model', 'sampled ± se', 'greedy ± se', 'gain ± se', 'KL to SFT',
             'wall time (min)', 'tokens/s', 'peak memory (GiB)', 'distinct replies',
             'distinct bigrams'], gold_rows) + f'\n\n![{gold_plot}]({gold_plot})\n\n'
         f'Best-of-N is the reward model\'s pick among N = {comparison["best_of"]} SFT samples. '
         'Standard errors are stratified by task family and level: these are fixed with the '
         'prompts, so the spread of scores between them is not counted as noise (the '
         'unstratified errors are in '
         f'`{COMPARISON}`, every prompt\'s scores in `{PER_PROMPT}`). '
         'Distinct replies: the fraction of different answers among a prompt\'s samples (lower '
         'is a narrower model). KL to SFT: nats per reply on the model\'s own samples of these '
         'prompts (best-of-N: the analytic log N - (N - 1)/N). Wall time, tokens/s (the median '
         'logged) and peak memory are those of the stage that made the model (best-of-N: the '
         'reward stage).\n\nOther contrasts, paired over the same prompts:\n\n'
         + report.table(['', 'gain ± se', 'standard errors'], contrast_rows)),
        ('Gold score by task family (sampled)', report.table(
            ['family', *(names[m] for m in MODELS)], family_rows)),
        ('Gold score by task level (sampled, ± se stratified by family)', report.table(
            ['level', *(names[m] for m in MODELS)], level_rows(comparison))),
        ('Reward model', '![calibration](reward/calibration.png)\n\n'
                         '![accuracy](reward/accuracy.png)'),
        (rl, '![reward against KL](rl/reward_vs_kl.png)\n\n![KL](rl/kl.png)'),
        ('Over-optimisation', over_optimisation(config, workdir)),
        ('The same prompts answered by each model', examples),
    ])
