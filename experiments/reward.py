"""Stage 3: reward modelling from an SFT workdir (`config.init_from`).

The reward model is the SFT model's transformer with a fresh score head; the reward of a
completion is the score at the `<|reward|>` token appended after it. It is trained on ranked
completions of the same prompt with the K-way ranking loss (all pairs of a prompt in one batch
element).

Comparisons come from JSONL files in any of the layouts of `gptstack.data.preference`, or, with
`data.train='embedded:tasks'`, are made the way the InstructGPT recipe makes them: `K` replies
per task prompt are sampled from the SFT model and ranked by a simulated labeler (the gold
scorer plus Bradley-Terry noise, `labeler.noise`). They are written to
`<workdir>/comparisons/{train,validation}.jsonl` in the K-way layout, exactly what a person
ranking with `experiments/rank.py` writes, and read back through the same loader.

Evaluation: held-out loss and pairwise accuracy (with its standard error), the rewards of the
better and worse completion of each pair, calibration of the predicted win probability
`sigmoid(r_i - r_j)` against the observed one, and for the task suite the agreement with the gold
scorer. At the end, for the task suite, best-of-N with the SFT policy: gold score against N.
Re-running resumes like every stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import pretrain as pretrain_stage
from experiments.sft import EMBEDDED_TASKS
from gptstack import loop, report, sharding, workdirs
from gptstack.best_of_n import expected_best_of_n, reward_scorer, sample_and_score
from gptstack.chat import sample_replies
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import ConfigError
from gptstack.data import preference, tasks
from gptstack.data.sources import DataError, SkipBudget, expand_paths
from gptstack.metrics import MetricsWriter, read_metrics, train_flops_per_token
from gptstack.model import GPT, ScoreModel
from gptstack.optim import make_optimizer
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import (
    TrainState,
    abstract_model,
    abstract_train_state,
    init_params,
    state_shardings,
)
from gptstack.steps.reward import (
    batch_shardings,
    make_reward_eval_step,
    make_reward_step,
    make_score_fn,
)

log = logging.getLogger(__name__)
CALIBRATION_BINS = 10


# --- comparisons ----------------------------------------------------------------------------
def policy(config, model_config, base_checkpointer, base_step, mesh, rules):
    """The SFT model's parameters and a function making its sampler for a tokenizer (for the
    comparisons and best-of-N)."""
    graphdef, abstract = abstract_model(lambda rngs: GPT(model_config, rngs=rngs))
    params = base_checkpointer.restore_params(
        base_step, abstract_with_shardings(abstract, sharding.param_shardings(abstract, mesh,
                                                                               rules)))
    shards = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
    return params, lambda tokenizer: Sampler(
        graphdef, model_config, mesh, rules,
        batch_size=shards * math.ceil(config.labeler.batch_size / shards),
        max_new_tokens=config.labeler.max_new_tokens,
        stop_ids=[tokenizer.end_of_turn_id, tokenizer.eot_id], pad_id=tokenizer.pad_id)


def make_task_comparisons(config, sampler, params, tokenizer, split: str, n_prompts: int,
                          path: pathlib.Path) -> dict:
    """Samples `data.completions` replies to `n_prompts` task prompts of `split`, ranks them
    with the simulated labeler and writes the K-way JSONL (with the gold scores as an extra
    field). Returns the labeler's statistics."""
    drawn = tasks.generate(split, n_prompts, config.seed)
    stream = list(tasks.SPLITS).index(split)  # one random stream per split, the same each run
    key = jax.random.fold_in(jax.random.key(config.seed), stream)
    sampling = SamplingParams(config.labeler.temperature)
    replies = sample_replies(sampler, params, tokenizer,
                             [t.messages(with_answer=False) for t in drawn], key, sampling,
                             n=config.data.completions, progress=f'sampling {split} replies')
    rng = np.random.default_rng([config.seed, stream])
    stats = {'groups': 0, 'all_tied': 0, 'pairs': 0, 'gold_pairs': 0, 'labeler_agrees': 0}
    tmp = path.with_suffix('.tmp')
    with open(tmp, 'w') as f:
        for task, texts in zip(drawn, replies, strict=True):
            gold = [tasks.score(task, text) for text in texts]
            ranks = preference.simulated_ranking(gold, config.labeler.noise, rng)
            f.write(json.dumps(preference.k_way_record(
                task.messages(with_answer=False), texts, ranks, gold=gold, family=task.family,
                level=task.level)) + '\n')
            stats['groups'] += 1
            stats['all_tied'] += len(set(ranks)) == 1
            for i in range(len(texts)):
                for j in range(len(texts)):
                    stats['pairs'] += ranks[i] < ranks[j]
                    if gold[i] > gold[j]:
                        stats['gold_pairs'] += 1
                        stats['labeler_agrees'] += ranks[i] < ranks[j]
    tmp.rename(path)
    log.info('%s comparisons: %s', split, stats)
    return stats


def embedded_comparisons(config, workdir, tokenizer, make_sampler, params) -> dict:
    """Makes (once; a resumed run reads them back) the task-suite comparison files."""
    out = workdir / 'comparisons'
    out.mkdir(exist_ok=True)
    stats_path = out / 'labeler.json'
    if not stats_path.exists():
        sampler = make_sampler(tokenizer)
        stats = {split: make_task_comparisons(config, sampler, params, tokenizer, split, n,
                                              out / f'{split}.jsonl')
                 for split, n in (('train', config.data.train_prompts),
                                  ('validation', config.data.validation_prompts))}
        stats['noise'] = config.labeler.noise
        stats_path.write_text(json.dumps(stats, indent=1))
    return json.loads(stats_path.read_text())


def read_split(paths: str, max_skips: int) -> list[preference.Comparison]:
    budget = SkipBudget(max_skips)
    comparisons = [c for pattern in paths.split(',')
                   for path in expand_paths((pattern.strip(),), 'comparisons')
                   for c in preference.read_comparisons(path, budget)]
    if budget.skipped:
        log.warning('skipped %d malformed comparisons %s', budget.skipped,
                    dict(budget.by_reason))
    if not comparisons:
        raise DataError(f'no comparisons in {paths}')
    return comparisons


# --- evaluation -----------------------------------------------------------------------------
def pair_table(rewards_bk: np.ndarray, ranks_bk: np.ndarray, valid_bk: np.ndarray,
               gold: list | None = None) -> dict[str, np.ndarray]:
    """One entry per ordered pair `(i better than j)` of the held-out groups: the rewards of the
    better and the worse completion, its group, and (with `gold`) the gold score difference."""
    out = {'better': [], 'worse': [], 'group': [], 'gold_diff': []}
    for b in range(len(rewards_bk)):
        for i in range(rewards_bk.shape[1]):
            for j in range(rewards_bk.shape[1]):
                if valid_bk[b, i] and valid_bk[b, j] and ranks_bk[b, i] < ranks_bk[b, j]:
                    out['better'].append(rewards_bk[b, i])
                    out['worse'].append(rewards_bk[b, j])
                    out['group'].append(b)
                    out['gold_diff'].append(gold[b][i] - gold[b][j] if gold else math.nan)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def ranking_metrics(rewards_bk, ranks_bk, valid_bk, gold=None, margin=0.0) -> dict:
    """Held-out loss (mean over prompts), pairwise accuracy with its standard error, mean
    rewards, and agreement with the gold scorer on pairs whose gold scores differ."""
    pairs = pair_table(rewards_bk, ranks_bk, valid_bk, gold)
    diff = pairs['better'] - pairs['worse']
    loss = np.logaddexp(0.0, -(diff - margin))
    groups = np.unique(pairs['group'])
    per_group = [loss[pairs['group'] == g].mean() for g in groups]
    correct = (diff > 0).astype(np.float64)
    metrics = {'val_loss': float(np.mean(per_group)), 'val_accuracy': float(correct.mean()),
               'val_accuracy_stderr': float(correct.std(ddof=1) / math.sqrt(len(correct))),
               'val_pairs': len(correct), 'val_reward_better': float(pairs['better'].mean()),
               'val_reward_worse': float(pairs['worse'].mean()),
               'val_reward_std': float(np.nanstd(np.where(valid_bk > 0, rewards_bk, np.nan)))}
    if gold is not None:
        # Every pair with different gold scores, whatever the (noisy) labeler said.
        agree = []
        for b, g in enumerate(gold):
            for i in range(len(g)):
                for j in range(len(g)):
                    if g[i] > g[j]:
                        agree.append(float(rewards_bk[b, i] > rewards_bk[b, j]))
        metrics['gold_agreement'] = float(np.mean(agree))
        metrics['gold_agreement_stderr'] = float(np.std(agree, ddof=1) / math.sqrt(len(agree)))
    return metrics


def calibration(rewards_bk, ranks_bk, valid_bk, bins: int = CALIBRATION_BINS):
    """`(predicted, observed, count)` per bin of the predicted probability that the first
    completion of a pair wins, `sigmoid(r_i - r_j)`, over both orders of every pair."""
    pairs = pair_table(rewards_bk, ranks_bk, valid_bk)
    diff = pairs['better'] - pairs['worse']
    predicted = 1 / (1 + np.exp(-np.concatenate([diff, -diff])))
    observed = np.concatenate([np.ones_like(diff), np.zeros_like(diff)])
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    rows = [(predicted[which == k].mean(), observed[which == k].mean(), int((which == k).sum()))
            for k in range(bins) if (which == k).any()]
    return [np.asarray(col) for col in zip(*rows, strict=True)]


# --- the stage ------------------------------------------------------------------------------
def run(config, workdir: pathlib.Path) -> str:
    # --- configs, mesh, base model: every check before expensive work ------------------------
    setup = pretrain_stage.setup(config)
    mesh, rules = setup.mesh, setup.rules
    tokenizer, model_config, base_checkpointer, base_step = workdirs.load_base(
        config.init_from, 'the SFT workdir to start the reward model from')
    seq_len, batch_size, k = config.data.seq_len, config.data.batch_size, config.data.completions
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f'data.seq_len={seq_len} exceeds the base model\'s max_seq_len='
                          f'{model_config.max_seq_len}')
    if k < 2:
        raise ConfigError(f'data.completions={k}: a comparison needs at least 2 completions')
    embedded = config.data.train == EMBEDDED_TASKS
    if embedded != (config.data.validation == EMBEDDED_TASKS):
        raise ConfigError('data.train and data.validation: use embedded:tasks for both or for '
                          'neither')
    shutil.copyfile(pathlib.Path(config.init_from) / 'tokenizer.model',
                    workdir / 'tokenizer.model')
    policy_params, make_sampler = policy(config, model_config, base_checkpointer, base_step,
                                         mesh, rules)

    # --- comparisons --------------------------------------------------------------------------
    labeler = None
    train_paths, val_paths = config.data.train, config.data.validation
    if embedded:
        labeler = embedded_comparisons(config, workdir, tokenizer, make_sampler, policy_params)
        train_paths = str(workdir / 'comparisons' / 'train.jsonl')
        val_paths = str(workdir / 'comparisons' / 'validation.jsonl')
    train_comparisons = read_split(train_paths, config.data.max_skips)
    if val_paths:
        val_comparisons = read_split(val_paths, config.data.max_skips)
    else:  # hold out a seeded fraction of the training records
        order = np.random.default_rng(config.seed).permutation(len(train_comparisons))
        n_val = max(1, round(config.data.val_fraction * len(train_comparisons)))
        val_comparisons = [train_comparisons[i] for i in sorted(order[:n_val])]
        train_comparisons = [train_comparisons[i] for i in sorted(order[n_val:])]
    train_examples, train_stats = preference.render_comparisons(
        tokenizer, train_comparisons, seq_len, k, truncate=config.data.truncate)
    val_examples, val_stats = preference.render_comparisons(
        tokenizer, val_comparisons, seq_len, k, truncate=config.data.truncate)
    # Gold scores of the held-out groups that were kept (not all tied), when every one has them.
    val_gold = [c.gold for c in val_comparisons if c.pairs]
    val_gold = val_gold if all(g is not None for g in val_gold) else None
    if not train_examples:
        raise DataError(f'{train_paths}: no training comparison has a pair (of '
                        f'{len(train_comparisons)}, {train_stats.all_tied} with all completions '
                        'tied): nothing to learn from')
    if not val_examples:
        raise DataError(f'no held-out comparison has a pair (of {len(val_comparisons)})')
    processes, index = jax.process_count(), jax.process_index()
    local_batch = batch_size // processes
    data_iterator = iter(preference.make_preference_dataset(
        train_examples, local_batch, seed=config.seed, process_index=index,
        process_count=processes))
    placement = batch_shardings(mesh, rules, batch_size)
    eval_batches = preference.make_preference_eval_batches(
        val_examples, local_batch, max_batches=config.data.eval_batches, process_index=index,
        process_count=processes)
    eval_device = [sharding.global_batch(b, placement) for b in eval_batches]

    # --- state: resumed, or the SFT transformer with a fresh score head ----------------------
    tx, schedule = make_optimizer(setup.optim)
    model_fn = lambda rngs: ScoreModel(model_config, rngs=rngs)  # noqa: E731
    graphdef, _ = abstract_model(model_fn)
    abstract_state = abstract_train_state(model_fn, tx)
    shardings = state_shardings(abstract_state, mesh, rules, tx)
    checkpointer = Checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
    latest = checkpointer.latest_step()
    resumed = pretrain_stage.resume(checkpointer, abstract_state, shardings, tokenizer,
                                    model_config, data_iterator)
    if resumed:
        state, wall_offset = resumed
    else:
        state = initial_state(model_fn, abstract_state, shardings, base_checkpointer,
                              base_step, tx, config.seed)
        wall_offset = 0.0
    base_checkpointer.close()

    # --- compiled functions and evaluation ----------------------------------------------------
    reward_id = tokenizer.reward_id
    train_step = make_reward_step(graphdef, tx, schedule, mesh, rules, shardings, batch_size,
                                  reward_id, accum_steps=setup.optim.accum_steps,
                                  margin=config.loss.margin)
    eval_step = make_reward_eval_step(graphdef, mesh, rules, shardings.params, batch_size,
                                      reward_id)
    n_val = len(val_examples)

    def held_out_rewards(params) -> np.ndarray:
        """`[groups, K]` rewards of the held-out groups (this process's share, in order)."""
        out = [np.asarray(jax.device_get(eval_step(params, b))) for b in eval_device]
        return np.concatenate(out)

    val_ranks = np.concatenate([b['ranks'] for b in eval_batches])
    val_valid = np.concatenate([b['valid'] for b in eval_batches])

    def evaluate(state) -> dict:
        rewards = held_out_rewards(state.params)
        # Padding groups (valid 0) add no pair; gold covers the groups evaluated.
        gold = val_gold[:len(rewards)] if val_gold and processes == 1 else None
        return ranking_metrics(rewards, val_ranks, val_valid, gold, config.loss.margin)

    writer = MetricsWriter(workdir, resume_step=latest)
    if latest is None:  # the untrained head: step 0 of the curves
        writer.write(0, evaluate(state))
    tokens_per_step = batch_size * k * seq_len
    meta = {'model': dataclasses.asdict(model_config), 'tokenizer_sha256': tokenizer.sha256,
            'seed': config.seed, 'config': config.to_dict(), 'init_from': str(config.init_from),
            'reward_token': '<|reward|>'}
    result = loop.train(
        state=state, step_fn=train_step,
        batches=(sharding.global_batch(b, placement) for b in data_iterator),
        data_iterator=data_iterator, config=setup.loop, checkpointer=checkpointer,
        writer=writer, workdir=workdir, evaluate=evaluate, sample=None,
        checkpoint_meta=meta, tokens_per_step=tokens_per_step,
        flops_per_step=train_flops_per_token(model_config, seq_len, lm_head=False) *
        tokens_per_step,
        peak_flops=setup.peak_flops, wall_time_offset=wall_offset)
    if result.status == 'finished':
        final = checkpointer.restore(checkpointer.latest_step(),
                                     abstract_with_shardings(abstract_state, shardings))[0]
        rewards = held_out_rewards(final.params)
        best_of = None
        if embedded and config.best_of_n.prompts:
            score_fn = make_score_fn(graphdef, mesh, rules, shardings.params,
                                     config.best_of_n.batch_size, reward_id)
            scorer = reward_scorer(score_fn, final.params, tokenizer,
                                   config.best_of_n.batch_size, seq_len)
            best_of = best_of_n_curve(config, make_sampler(tokenizer), policy_params, tokenizer,
                                      scorer)
            writer.write(int(final.step), {f'best_of_{n}/gold': v['rm'] for n, v in
                                           best_of.items()})
        if jax.process_index() == 0:
            path = write_report(workdir, config, labeler, train_stats, val_stats, rewards,
                                val_ranks, val_valid, best_of)
            log.info('report: %s', path)
    writer.close()
    checkpointer.close()
    return result.status


def initial_state(model_fn, abstract_state, shardings, base_checkpointer, base_step, tx,
                  seed: int) -> TrainState:
    """The SFT model's `transformer` subtree, a fresh score head and a fresh optimizer, created
    directly in their shardings (no device holds more than its shards)."""
    backbone = base_checkpointer.restore_params(base_step, {
        'transformer': abstract_with_shardings(abstract_state.params['transformer'],
                                               shardings.params['transformer'])})
    backbone = nnx.to_pure_dict(nnx.State(backbone))

    def create(key, backbone):
        params = init_params(model_fn, key)
        nnx.replace_by_pure_dict(params, backbone)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(create, out_shardings=shardings)(jax.random.key(seed), backbone)


def best_of_n_curve(config, sampler, policy_params, tokenizer, scorer) -> dict[int, dict]:
    """Gold score of best-of-N on held-out (test-split) task prompts for N = 1, 2, 4, ...:
    picked by the reward model (`rm`, mean and standard error over prompts) and, as the
    ceiling, by the gold scorer itself (`oracle`)."""
    drawn = tasks.generate('test', config.best_of_n.prompts, config.seed)
    pool = config.best_of_n.max_n
    conversations = [t.messages(with_answer=False) for t in drawn]
    replies, rewards = sample_and_score(
        sampler, policy_params, tokenizer, scorer, conversations, pool,
        jax.random.fold_in(jax.random.key(config.seed), 7919),
        SamplingParams(config.labeler.temperature), progress='best-of-N samples')
    gold = np.asarray([[tasks.score(t, r) for r in rs] for t, rs in zip(drawn, replies,
                                                                        strict=True)])
    curve, n = {}, 1
    single = expected_best_of_n(rewards, gold, 1)
    while n <= pool:
        by_rm = expected_best_of_n(rewards, gold, n)
        by_gold = expected_best_of_n(gold + 1e-9 * rewards, gold, n)  # ties broken by the RM
        gain = by_rm - single  # paired over prompts: far less noisy than the two means
        curve[n] = {'rm': float(by_rm.mean()),
                    'rm_stderr': float(by_rm.std(ddof=1) / math.sqrt(len(by_rm))),
                    'gain': float(gain.mean()),
                    'gain_stderr': float(gain.std(ddof=1) / math.sqrt(len(gain))),
                    'oracle': float(by_gold.mean())}
        n *= 2
    return curve


def write_report(workdir, config, labeler, train_stats, val_stats, rewards, ranks, valid,
                 best_of) -> str:
    records = read_metrics(workdir)
    evals = [r for r in records if 'val_accuracy' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
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
                              f'{train_stats.truncated} completions truncated)'),
        ('held-out comparisons', f'{val_stats.groups} prompts, {val_stats.pairs} pairs'),
        ('steps', last.get('step', 'n/a')),
        ('held-out accuracy: untrained head → trained',
         f'{first.get("val_accuracy", math.nan):.3f} → {last.get("val_accuracy", math.nan):.3f}'
         f' ± {last.get("val_accuracy_stderr", math.nan):.3f}'),
        ('held-out loss', f'{first.get("val_loss", math.nan):.4f} → '
                          f'{last.get("val_loss", math.nan):.4f}'),
    ]
    if 'gold_agreement' in last:
        summary.append(('agreement with the gold scorer (held-out pairs of different gold)',
                        f'{last["gold_agreement"]:.3f} ± {last["gold_agreement_stderr"]:.3f}'))
    sections = [('Summary', report.table(['', ''], summary))]
    if labeler:
        rows = [(split, s['groups'], s['all_tied'], s['pairs'],
                 f'{s["labeler_agrees"] / max(s["gold_pairs"], 1):.3f}')
                for split, s in labeler.items() if isinstance(s, dict)]
        sections.append((f'Simulated labeler (Bradley-Terry noise {labeler["noise"]} on the gold '
                         'score)', report.table(
                             ['split', 'prompts', 'all tied', 'ranked pairs',
                              'labeler agrees with gold'], rows)))
    if best_of:
        plots.append(report.plot(
            [{'step': n, 'rm': v['rm'], 'oracle': v['oracle']} for n, v in best_of.items()],
            {'picked by the reward model': 'rm', 'picked by the gold scorer (ceiling)': 'oracle'},
            workdir / 'best_of_n.png', title='Best-of-N gold score (held-out prompts)',
            ylabel='mean gold score', xlabel='N (samples per prompt)', logx=True))
        sections.append((
            f'Best-of-N with the SFT policy (gold score on {config.best_of_n.prompts} held-out '
            'prompts; the gain over N = 1 is paired by prompt)',
            report.table(['N', 'picked by the RM', '± se', 'gain over N = 1', '± se',
                          'picked by gold (ceiling)'],
                         [(n, v['rm'], v['rm_stderr'], v['gain'], v['gain_stderr'], v['oracle'])
                          for n, v in best_of.items()])))
    sections.append(('Curves and calibration', '\n\n'.join(f'![{p}]({p})' for p in plots)))
    return report.write(workdir, 'Reward model report', sections)
