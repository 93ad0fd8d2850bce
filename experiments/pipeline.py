"""The main job: the four stages of the recipe in one workdir, then one report.

    tokenizer -> pretrain -> sft -> reward (comparisons sampled from the SFT model and ranked by
    the simulated labeler) -> rl (PPO against the reward model) -> compare

Each stage runs in `<workdir>/<stage>/` exactly as `experiments.run` would run it alone, with
its `init_from` / `reward_from` / tokenizer path wired to the stage before it. `pipeline.json`
records the stages that finished: re-running the command skips them, and a stage that was
interrupted resumes from its own latest checkpoint. The last step, `compare`, puts the base
model (prompted few-shot), the SFT model, best-of-N with the reward model and the PPO policy
in front of the same held-out task prompts, and `report.md` lays the whole run side by side.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import numpy as np

from experiments import pretrain, reward, rl, sft, tokenizer
from gptstack import report, workdirs
from gptstack.best_of_n import expected_best_of_n, reward_scorer
from gptstack.chat import sample_replies
from gptstack.config import GPTConfig
from gptstack.data import tasks
from gptstack.metrics import read_metrics
from gptstack.model import GPT, ScoreModel, count_params
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import abstract_model
from gptstack.steps.reward import make_score_fn

log = logging.getLogger(__name__)

STAGES = {'tokenizer': tokenizer.run, 'pretrain': pretrain.run, 'sft': sft.run,
          'reward': reward.run, 'rl': rl.run}
LEDGER = 'pipeline.json'
COMPARISON = 'comparison.json'
# One line per held-out prompt of the comparison: its family, level and every model's scores.
PER_PROMPT = 'comparison_prompts.jsonl'
# The models of the comparison, in the order of the recipe.
MODELS = ('base', 'sft', 'best_of_n', 'ppo')
MODEL_NAMES = {'base': 'base (few-shot prompt)', 'sft': 'SFT', 'best_of_n': 'best-of-N (SFT + RM)',
               'ppo': 'PPO'}


def wire(config, workdir: pathlib.Path) -> None:
    """Points every stage at the output of the one before it."""
    config.pretrain.tokenizer.path = str(workdir / 'tokenizer' / tokenizer.MODEL_FILE)
    config.sft.init_from = str(workdir / 'pretrain')
    config.reward.init_from = str(workdir / 'sft')
    config.rl.init_from = str(workdir / 'sft')
    config.rl.reward_from = str(workdir / 'reward')


def read_ledger(workdir: pathlib.Path) -> dict:
    path = workdir / LEDGER
    return json.loads(path.read_text()) if path.exists() else {}


def write_whole(path: pathlib.Path, text: str) -> None:
    """Written whole or not at all (a kill mid-write leaves the previous file)."""
    temporary = path.with_suffix('.tmp')
    temporary.write_text(text)
    temporary.replace(path)


def write_json(path: pathlib.Path, value) -> None:
    write_whole(path, json.dumps(value, indent=1) + '\n')


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    write_whole(path, ''.join(json.dumps(r) + '\n' for r in records))


def run(config, workdir: pathlib.Path) -> str:
    wire(config, workdir)
    ledger = read_ledger(workdir)
    for name, stage_run in STAGES.items():
        if name in ledger:
            log.info('stage %s finished earlier (%.1f min): skipped', name,
                     ledger[name]['seconds'] / 60)
            continue
        stage_dir = workdir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        stage_config = config[name]
        if jax.process_index() == 0:
            write_json(stage_dir / 'config.json', stage_config.to_dict())
        log.info('=== stage %s in %s', name, stage_dir)
        start = time.perf_counter()
        status = stage_run(stage_config, stage_dir)
        if status != 'finished':
            return status
        ledger[name] = {'seconds': time.perf_counter() - start}
        if jax.process_index() == 0:
            write_json(workdir / LEDGER, ledger)
    comparison_path = workdir / COMPARISON
    if comparison_path.exists():
        comparison = json.loads(comparison_path.read_text())
    else:
        start = time.perf_counter()
        comparison = compare(config, workdir)
        comparison['seconds'] = time.perf_counter() - start
        per_prompt = comparison.pop('per_prompt')
        if jax.process_index() == 0:
            write_jsonl(workdir / PER_PROMPT, per_prompt)
            write_json(comparison_path, comparison)
    if jax.process_index() == 0:
        log.info('report: %s', write_report(config, workdir, ledger, comparison))
    return 'finished'


# --- the comparison on held-out prompts ---------------------------------------------------------
def few_shot_prompt(task: tasks.Task, shots: list[tasks.Task]) -> str:
    """A plain-text prompt that coaxes a base model into answering: solved examples of the same
    family, then the question."""
    solved = ''.join(f'Question: {s.prompt}\nAnswer: {s.answer}\n\n' for s in shots)
    return f'{solved}Question: {task.prompt}\nAnswer:'


def few_shot_replies(sampler: Sampler, params, tok, held_out: list[tasks.Task], n_shots: int,
                     n: int, key: jax.Array, sampling: SamplingParams,
                     seed: int) -> list[list[str]]:
    """`n` base-model answers to each task: the continuation of its few-shot prompt up to the
    first newline. Shots come from the train split; the longest prompt that fits the context
    (with room for the answer) keeps as many shots as it can."""
    pool = tasks.generate('train', 50 * len(tasks.FAMILIES), seed)
    by_family = {f: [t for t in pool if t.family == f] for f in tasks.FAMILIES}
    room = sampler.config.max_seq_len - sampler.max_new_tokens
    prompts = []
    for task in held_out:
        for k in range(n_shots, -1, -1):
            ids = [tok.eot_id, *tok.encode(few_shot_prompt(task, by_family[task.family][:k]))]
            if len(ids) <= room:
                break
        prompts += [ids] * n
    texts = []
    for i, start in enumerate(range(0, len(prompts), sampler.batch_size)):
        chunk = prompts[start:start + sampler.batch_size]
        out = sampler(params, chunk, jax.random.fold_in(key, i), sampling)
        texts += [tok.decode(row[:length]).split('\n')[0].strip()
                  for row, length in zip(out['tokens'], out['lengths'], strict=True)]
    return [texts[i:i + n] for i in range(0, len(texts), n)]


def diversity(replies: list[list[str]]) -> dict:
    """How different a model's samples for one prompt are: the fraction of distinct replies and
    of distinct word bigrams among all bigrams, averaged over prompts."""
    distinct, bigram = [], []
    for group in replies:
        distinct.append(len(set(group)) / len(group))
        grams = [tuple(w[i:i + 2]) for w in (r.split() for r in group) for i in range(len(w) - 1)]
        if grams:
            bigram.append(len(set(grams)) / len(grams))
    return {'distinct_replies': float(np.mean(distinct)),
            'distinct_bigrams': float(np.mean(bigram)) if bigram else 0.0}


def mean_and_stderr(values: np.ndarray, strata: np.ndarray | None = None) -> tuple[float, float]:
    """The mean of per-prompt values and its standard error. Given each prompt's stratum (its
    task family and level), the error is that of the mean given how many prompts each stratum
    holds (post-stratification): the variance of the values around their stratum's mean,
    pooled over strata, divided by the number of prompts. With equal strata it is the textbook
    stratified error, the square root of sum_h w_h^2 s_h^2 / n_h. Differences between strata,
    which the prompts fix, then no longer count as noise."""
    n = len(values)
    if strata is None:
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n))
    labels, index = np.unique(strata, return_inverse=True)
    if n <= len(labels):
        raise ValueError(f'{n} values in {len(labels)} strata: a stratified standard error '
                         'needs more values than strata')
    means = np.bincount(index, weights=values) / np.bincount(index)
    variance = ((values - means[index]) ** 2).sum() / (n - len(labels))
    return float(values.mean()), float(math.sqrt(variance / n))


def compare(config, workdir: pathlib.Path) -> dict:
    """Gold scores, diversity and example answers of the four models on the same held-out
    prompts. Each model draws `samples` replies per prompt at temperature 1 (a prompt's score
    is the mean over them) and one greedy reply; best-of-N is the reward model's pick among N
    of the SFT samples, scored exactly over all N-subsets of the pool
    (`gptstack.best_of_n.expected_best_of_n`). Standard errors are stratified by the task
    generator's cells, family and level; the unstratified ones are kept alongside."""
    c = config.compare
    held_out = tasks.generate('test', c.prompts, config.seed)
    cells = np.asarray([f'{t.family}/{t.level}' for t in held_out])
    if len(held_out) <= len(set(cells)):
        raise ValueError(f'compare.prompts={c.prompts}: the held-out prompts fall in '
                         f'{len(set(cells))} task families and levels, and stratified standard '
                         'errors need more prompts than that')
    conversations = [t.messages(with_answer=False) for t in held_out]
    key = jax.random.key(config.seed + 2)
    sampled, greedy = SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)
    replies, greedy_replies = {}, {}
    for model, stage in (('base', 'pretrain'), ('sft', 'sft'), ('ppo', 'rl')):
        tok, model_config, graphdef, params, mesh, _ = workdirs.load_model(workdir / stage)
        shards = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
        stops = [tok.eot_id] if model == 'base' else [tok.end_of_turn_id, tok.eot_id]
        sampler = Sampler(graphdef, model_config, mesh, 'fsdp',
                          batch_size=shards * math.ceil(c.batch_size / shards),
                          max_new_tokens=c.max_new_tokens, stop_ids=stops, pad_id=tok.pad_id)
        for mode, sampling, n, store in (('sampled', sampled, c.samples, replies),
                                         ('greedy', greedy, 1, greedy_replies)):
            mode_key = jax.random.fold_in(key, MODELS.index(model) * 2 + (mode == 'greedy'))
            log.info('compare: %s, %s', MODEL_NAMES[model], mode)
            if model == 'base':
                store[model] = few_shot_replies(sampler, params, tok, held_out, c.few_shot, n,
                                                mode_key, sampling, config.seed)
            else:
                store[model] = sample_replies(sampler, params, tok, conversations, mode_key,
                                              sampling, n, progress=f'{model} {mode}')
        del params

    # The reward model scores the SFT pool; its pick among N is best-of-N.
    tok, scorer = load_scorer(workdir / 'reward', c.batch_size)
    flat = scorer([m for m in conversations for _ in range(c.samples)],
                  [[{'role': 'assistant', 'content': r}] for rs in replies['sft'] for r in rs])
    rewards = flat.reshape(len(held_out), c.samples)
    gold = {m: np.asarray([[tasks.score(t, r) for r in rs] for t, rs in
                           zip(held_out, replies[m], strict=True)]) for m in replies}
    per_prompt = {m: g.mean(axis=1) for m, g in gold.items()}
    per_prompt['best_of_n'] = expected_best_of_n(rewards, gold['sft'], c.best_of)
    greedy_gold = {m: np.asarray([tasks.score(t, rs[0]) for t, rs in
                                  zip(held_out, greedy_replies[m], strict=True)])
                   for m in greedy_replies}

    result = {'prompts': len(held_out), 'samples': c.samples, 'best_of': c.best_of,
              'models': {}, 'families': {}, 'examples': []}
    for model in MODELS:
        mean, stderr = mean_and_stderr(per_prompt[model], cells)
        entry = {'gold': mean, 'gold_stderr': stderr,
                 'gold_stderr_unstratified': mean_and_stderr(per_prompt[model])[1]}
        if model in greedy_gold:
            entry['greedy'], entry['greedy_stderr'] = mean_and_stderr(greedy_gold[model], cells)
            entry.update(diversity(replies[model]))
        result['models'][model] = entry
    # Differences paired over prompts: the same prompts, so far less noisy than two means.
    for model, baseline in (('sft', 'base'), ('best_of_n', 'sft'), ('ppo', 'sft')):
        gain, gain_stderr = mean_and_stderr(per_prompt[model] - per_prompt[baseline], cells)
        result['models'][model]['gain'] = {'over': baseline, 'mean': gain, 'stderr': gain_stderr}
    for family in tasks.FAMILIES:
        mine = np.asarray([t.family == family for t in held_out])
        if mine.any():
            result['families'][family] = {m: float(per_prompt[m][mine].mean()) for m in MODELS}
    for i, task in enumerate(held_out[:c.examples]):
        best = int(np.argmax(rewards[i]))
        result['examples'].append({
            'prompt': task.prompt, 'answer': str(task.answer),
            'base': replies['base'][i][0], 'sft': replies['sft'][i][0],
            'best_of_n': replies['sft'][i][best], 'ppo': replies['ppo'][i][0]})
    # Every prompt's scores, for analyses of one's own.
    result['per_prompt'] = [
        {'family': t.family, 'level': t.level, 'prompt': t.prompt,
         'gold': {m: per_prompt[m][i] for m in MODELS},
         'greedy': {m: greedy_gold[m][i] for m in greedy_gold}}
        for i, t in enumerate(held_out)]
    return result


def load_scorer(workdir: pathlib.Path, batch_size: int):
    """The tokenizer and a `scorer(prompts, completions) -> rewards` of a reward-model workdir."""
    tok, _, graphdef, params, mesh, meta = workdirs.load_reward_model(workdir)
    shards = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
    batch_size = shards * math.ceil(batch_size / shards)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    score_fn = make_score_fn(graphdef, mesh, 'fsdp', param_shardings, batch_size, tok.reward_id)
    return tok, reward_scorer(score_fn, params, tok, batch_size, meta['config']['data']['seq_len'])


# --- the report ---------------------------------------------------------------------------------
def _median(records: list[dict], key: str) -> float | str:
    values = [r[key] for r in records if key in r]
    return float(np.median(values)) if values else 'n/a'


def _last(records: list[dict], key: str) -> dict:
    return next((r for r in reversed(records) if key in r), {})


def _steps(records: list[dict]) -> int:
    return max((r['step'] for r in records), default=0)


def stage_table(config, workdir: pathlib.Path, ledger: dict) -> list[tuple]:
    """The talk's table for this run: per stage, its data, what it trained on, the model and
    what it cost."""
    def n_params(stage, cls):
        model_config = GPTConfig.from_dict(workdirs.latest_meta(workdir / stage)['model'])
        return count_params(abstract_model(lambda rngs: cls(model_config, rngs=rngs))[1])

    def minutes(stage):
        return f'{ledger[stage]["seconds"] / 60:.1f}'

    def packed_tokens(data, steps):  # a language-model stage's steps x batch x sequence
        return (f'{steps * data.batch_size * data.seq_len:,} tokens '
                f'({steps} × {data.batch_size} × {data.seq_len})')

    rows = []
    pre, sft_c, rm, ppo = config.pretrain, config.sft, config.reward, config.rl
    sources = ', '.join(f'{name} {spec.weight:g}' for name, spec in pre.data.sources.items())
    vocab = config.tokenizer.tokenizer.vocab_size
    rows.append(('0 tokenizer', f'mixture ({sources})', f'BPE, {vocab} tokens', '', '',
                 minutes('tokenizer'), ''))
    records = read_metrics(workdir / 'pretrain')
    steps = _steps(records)
    rows.append(('1 pretraining', f'mixture ({sources})', packed_tokens(pre.data, steps),
                 f'{n_params("pretrain", GPT):,}', f'lr {pre.optim.lr:g}', minutes('pretrain'),
                 _median(records, 'tokens_per_sec')))
    records = read_metrics(workdir / 'sft')
    steps = _steps(records)
    rows.append(('2 SFT', f'{sft_c.data.train_tasks:,} task conversations',
                 packed_tokens(sft_c.data, steps), f'{n_params("sft", GPT):,}',
                 f'lr {sft_c.optim.lr:g}', minutes('sft'), _median(records, 'tokens_per_sec')))
    records = read_metrics(workdir / 'reward')
    steps = _steps(records)
    rows.append(('3 reward model', f'{rm.data.train_prompts:,} prompts × '
                 f'{rm.data.completions} SFT samples, ranked',
                 f'{steps * rm.data.batch_size:,} ranked groups ({steps} × '
                 f'{rm.data.batch_size})', f'{n_params("reward", ScoreModel):,}',
                 f'lr {rm.optim.lr:g}', minutes('reward'), _median(records, 'tokens_per_sec')))
    records = read_metrics(workdir / 'rl')
    steps = _steps(records)
    rows.append(('4 RL (PPO)', f'{ppo.data.train_prompts:,} task prompts',
                 f'{steps * ppo.data.batch_size:,} rollouts ({steps} × {ppo.data.batch_size}, '
                 f'≤ {ppo.data.max_new_tokens} new tokens)', f'{n_params("rl", GPT):,} + critic',
                 f'lr {ppo.optim.lr:g}, β {ppo.rl.ppo.kl_coef:g}', minutes('rl'),
                 _median(records, 'tokens_per_sec')))
    return rows


def intervals(sft: dict, ppo: dict, stderr: str = 'gold_stderr') -> str:
    """The two models' gold scores as `mean ± 2 se` intervals, and whether they overlap."""
    spans = [(m['gold'] - 2 * m[stderr], m['gold'] + 2 * m[stderr]) for m in (sft, ppo)]
    if spans[1][0] > spans[0][1]:
        verdict = 'PPO above SFT, not overlapping'
    elif spans[0][0] > spans[1][1]:
        verdict = 'PPO below SFT, not overlapping'
    else:
        verdict = 'overlapping'
    return ' vs '.join(f'[{a:.4f}, {b:.4f}]' for a, b in spans) + f' ({verdict})'


def write_report(config, workdir: pathlib.Path, ledger: dict, comparison: dict) -> str:
    models = comparison['models']
    gold_rows = []
    for model in MODELS:
        entry = models[model]
        gain = entry.get('gain')
        gold_rows.append((
            MODEL_NAMES[model], f'{entry["gold"]:.4f} ± {entry["gold_stderr"]:.4f}',
            f'{entry["greedy"]:.4f} ± {entry["greedy_stderr"]:.4f}' if 'greedy' in entry else '',
            f'{gain["mean"]:+.4f} ± {gain["stderr"]:.4f} (over {MODEL_NAMES[gain["over"]]})'
            if gain else '',
            entry.get('distinct_replies', ''), entry.get('distinct_bigrams', '')))
    family_rows = [(family, *(scores[m] for m in MODELS))
                   for family, scores in comparison['families'].items()]
    gold_plot = report.bars({MODEL_NAMES[m]: models[m]['gold'] for m in MODELS},
                            {MODEL_NAMES[m]: 2 * models[m]['gold_stderr'] for m in MODELS},
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
             title='4 PPO (train rollouts)', ylabel='per response'),
    ], workdir / 'stages.png', title='The four stages')
    rm_eval, rl_eval = _last(rm_r, 'val_accuracy'), _last(rl_r, 'val/kl')
    ppo_gain = models['ppo']['gain']
    stage_seconds = sum(v['seconds'] for v in ledger.values())
    compare_seconds = comparison.get('seconds', 0.0)
    headline = [
        ('held-out task prompts', f'{comparison["prompts"]} (test split), {comparison["samples"]} '
                                  'samples each at temperature 1, plus one greedy reply'),
        ('gold score: base → SFT → best-of-N → PPO',
         ' → '.join(f'{models[m]["gold"]:.3f}' for m in MODELS)),
        ('PPO over SFT (paired over prompts)',
         f'{ppo_gain["mean"]:+.4f} ± {ppo_gain["stderr"]:.4f} '
         f'({ppo_gain["mean"] / max(ppo_gain["stderr"], 1e-12):.1f} standard errors)'),
        ('SFT and PPO gold score, ± 2 standard errors', intervals(models['sft'], models['ppo'])),
        ('the same, standard errors not stratified',
         intervals(models['sft'], models['ppo'], 'gold_stderr_unstratified')),
        ('reward model: held-out pairwise accuracy',
         f'{rm_eval.get("val_accuracy", math.nan):.3f} ± '
         f'{rm_eval.get("val_accuracy_stderr", math.nan):.3f} (agreement with the gold scorer '
         f'{rm_eval.get("gold_agreement", math.nan):.3f})'),
        ('KL of the final PPO policy to the SFT model',
         f'{rl_eval.get("val/kl", math.nan):.3f} nats per response'),
        ('wall time', f'{(stage_seconds + compare_seconds) / 60:.1f} min (the comparison '
                      f'{compare_seconds / 60:.1f} min)'),
    ]
    examples = '\n\n'.join(report.code_block(
        f'prompt: {e["prompt"]}\nexpected: {e["answer"]}\n' + '\n'.join(
            f'{MODEL_NAMES[m]:>22}: {e[m]!r}' for m in MODELS)) for e in comparison['examples'])
    links = ('Stage reports: [tokenizer](tokenizer/report.md), [pretraining](pretrain/report.md), '
             '[SFT](sft/report.md), [reward model](reward/report.md), [PPO](rl/report.md).')
    return report.write(workdir, 'gptstack pipeline report', [
        ('Summary', report.table(['', ''], headline)),
        ('The stages', report.table(
            ['stage', 'data', 'trained on', 'parameters', 'optimiser', 'wall time (min)',
             'median tokens/s'], stage_table(config, workdir, ledger))
         + f'\n\n![{stages_plot}]({stages_plot})\n\n{links}'),
        ('Gold score on the same held-out prompts', report.table(
            ['model', 'sampled ± se', 'greedy ± se', 'gain ± se', 'distinct replies',
             'distinct bigrams'], gold_rows) + f'\n\n![{gold_plot}]({gold_plot})\n\n'
         f'Best-of-N is the reward model\'s pick among N = {comparison["best_of"]} SFT samples. '
         'Standard errors are stratified by task family and level: these are fixed with the '
         'prompts, so the spread of scores between them is not counted as noise (the '
         'unstratified errors are in '
         f'`{COMPARISON}`, every prompt\'s scores in `{PER_PROMPT}`). '
         'Distinct replies: the fraction of different answers among a prompt\'s samples (lower '
         'is a narrower model).'),
        ('Gold score by task family (sampled)', report.table(
            ['family', *(MODEL_NAMES[m] for m in MODELS)], family_rows)),
        ('Reward model', '![calibration](reward/calibration.png)\n\n'
                         '![accuracy](reward/accuracy.png)'),
        ('PPO', '![reward against KL](rl/reward_vs_kl.png)\n\n![KL](rl/kl.png)'),
        ('The same prompts answered by each model', examples),
    ])
