"""Stage 3: reward modelling from an SFT workdir (`config.init_from`).

The reward model is the SFT model's transformer with a fresh score head; the reward of a
completion is the score at the `<|reward|>` token appended after it. It is trained on ranked
completions of the same prompt with the K-way ranking loss (all pairs of a prompt in one step),
each group one branched sequence, packed whole into rows (`gptstack.data.preference`).

Comparisons come from JSONL files in any of the layouts of `gptstack.data.preference`, or, with
`data.train='embedded:tasks'`, from the simulated labeler (`gptstack.labeler`), which ranks
replies sampled from the SFT model.

Evaluation (`gptstack.evals.ranking`): held-out loss and pairwise accuracy (with its standard
error), the rewards of the better and worse completion of each pair, calibration of the predicted
win probability `sigmoid(r_i - r_j)`, and for the task suite the agreement with the gold scorer.
At the end, for the task suite, best-of-N with the SFT policy: gold score against N.
Re-running resumes like every stage.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptstack import labeler, sharding, stage
from gptstack import lineage as lineages
from gptstack.checkpoint import abstract_with_shardings
from gptstack.config import ConfigError
from gptstack.data import preference, tasks
from gptstack.data.sources import DataError, hold_out, read_records
from gptstack.evals import best_of_n, gold, ranking
from gptstack.files import write_whole
from gptstack.metrics import train_flops_per_token
from gptstack.model import GPT, ScoreModel
from gptstack.reports import reward as reward_report
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import TrainState, init_params
from gptstack.steps.reward import (
    batch_shardings,
    make_reward_eval_step,
    make_reward_step,
    make_score_fn,
)

log = logging.getLogger(__name__)


def validate(config) -> stage.Setup:
    setup = stage.setup(config)
    if (config.data.train == tasks.EMBEDDED_TASKS) != (
            config.data.validation == tasks.EMBEDDED_TASKS):
        raise ConfigError('data.train and data.validation: use embedded:tasks for both or for '
                          'neither')
    return setup


def policy(config, lineage: lineages.Lineage, setup: stage.Setup):
    """The SFT model's parameters (on this stage's mesh) and a function making its sampler."""
    model_config = setup.computing(lineage.model_config)
    graphdef, params = lineage.restore_params(GPT, setup.mesh, setup.rules,
                                              model_config=model_config)
    tok = lineage.tokenizer
    return params, lambda: Sampler(
        graphdef, model_config, setup.mesh, setup.rules, batch_size=config.labeler.batch_size,
        max_new_tokens=config.labeler.max_new_tokens, stop_ids=[tok.end_of_turn_id, tok.eot_id],
        pad_id=tok.pad_id, vocab_size=tok.vocab_size)


def load_comparisons(config, workdir: pathlib.Path, tokenizer, make_sampler, policy_params,
                     max_len: int):
    """The rendered train and held-out comparisons with their statistics, the held-out groups'
    gold scores (the task suite only) and the labeler's statistics (None for JSONL data).
    `max_len`: the model's context, which a prompt and its longest completion must fit."""
    stats, train_paths, val_paths = None, config.data.train, config.data.validation
    if config.data.train == tasks.EMBEDDED_TASKS:
        stats = labeler.comparisons(config, workdir / 'comparisons', make_sampler,
                                    policy_params, tokenizer)
        train_paths, val_paths = (str(workdir / 'comparisons' / f'{split}.jsonl')
                                  for split in ('train', 'validation'))
    read = lambda paths: read_records(  # noqa: E731
        paths, preference.read_comparisons, 'comparisons', config.data.max_skips)
    train = read(train_paths)
    val = read(val_paths) if val_paths else None
    if val is None:  # hold out a seeded fraction of the training records
        train, val = hold_out(train, config.data.val_fraction, config.seed)
    seq_len, k, truncate = config.data.seq_len, config.data.completions, config.data.truncate
    render = lambda comparisons: preference.render_branched(  # noqa: E731
        tokenizer, comparisons, seq_len, k, max_len=max_len, truncate=truncate)
    (train_examples, train_stats), (val_examples, val_stats) = render(train), render(val)
    if not train_examples:
        raise DataError(f'{train_paths}: no training comparison has a pair (of {len(train)}, '
                        f'{train_stats.all_tied} with all completions tied): nothing to learn')
    if not val_examples:
        raise DataError(f'no held-out comparison has a pair (of {len(val)})')
    # Gold scores of the held-out groups that were kept (not all tied), when every one has them.
    val_gold = [c.gold for c in val if c.pairs]
    val_gold = val_gold if all(g is not None for g in val_gold) else None
    return (train_examples, train_stats), (val_examples, val_stats), val_gold, stats


def batches(config, train: list[dict], val: list[dict]):
    """The training iterator and the held-out batches (this process's rows)."""
    local_batch = config.data.batch_size // jax.process_count()
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    seq_len = config.data.seq_len
    data_iterator = iter(preference.make_branched_dataset(train, seq_len, local_batch,
                                                          seed=config.seed, **where))
    return data_iterator, preference.make_branched_eval_batches(
        val, seq_len, local_batch, max_batches=config.data.eval_batches, **where)


def make_evaluate(config, eval_step, eval_batches: list[dict], placement, val: list[dict],
                  val_gold):
    """`(evaluate(state) -> ranking metrics, held_out_rewards(params) -> [groups, K], ranks,
    valid)` over the held-out groups in the fixed held-out batches (all of them unless
    `data.eval_batches` cuts them short), whole on every process (each holds its slice of every
    global batch; `held_out_rewards` is a collective)."""
    eval_device = [sharding.global_batch(b, placement) for b in eval_batches]
    k = config.data.completions
    in_batches = np.unique(np.concatenate([sharding.to_host(b['group']).ravel()
                                           for b in eval_device]))
    evaluated = in_batches[in_batches > 0] - 1  # indices of the groups in `val`
    ranks = np.zeros((len(evaluated), k), np.int32)
    valid = np.zeros((len(evaluated), k), np.int32)
    for row, index in enumerate(evaluated):
        example = val[index]
        branch_ids = example['branch_ids']
        last = (branch_ids > 0) & (branch_ids != np.append(branch_ids[1:], -1))
        branches = branch_ids[last] - 1
        ranks[row, branches] = example['ranks'][last]
        valid[row, branches] = 1
    gold = [val_gold[i] for i in evaluated] if val_gold else None
    row_of = np.full(len(val) + 1, -1)
    row_of[evaluated + 1] = np.arange(len(evaluated))

    def held_out_rewards(params) -> np.ndarray:
        rewards = np.full((len(evaluated), k), np.nan, np.float32)
        for batch in eval_device:
            slot_rewards, group = (sharding.to_host(x) for x in eval_step(params, batch))
            rewards[row_of[group[group > 0]]] = slot_rewards[group > 0]
        return rewards

    def evaluate(state) -> dict:
        return ranking.ranking_metrics(held_out_rewards(state.params), ranks, valid, gold,
                                       config.loss.margin)

    return evaluate, held_out_rewards, ranks, valid


def initial_state(trainable: stage.Trainable, lineage: lineages.Lineage, mesh, rules: str,
                  seed: int) -> TrainState:
    """The SFT model's `transformer` subtree, a fresh score head and a fresh optimizer, created
    directly in their shardings (no device holds more than its shards)."""
    backbone = lineage.restore_transformer(trainable.abstract_params('transformer'), mesh,
                                           rules)

    def create(key, backbone):
        params = init_params(trainable.model_fn, key)
        nnx.replace_by_pure_dict(params, backbone)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=trainable.tx.init(params))

    return jax.jit(create, out_shardings=trainable.shardings)(jax.random.key(seed), backbone)


def best_of_n_curve(config, sampler, policy_params, tokenizer, scorer) -> dict[int, dict]:
    """Best-of-N gold scores (N = 1, 2, 4, ...) of the SFT policy with this reward model on
    held-out (test-split) task prompts, from one pool of `best_of_n.max_n` samples each."""
    drawn = tasks.generate('test', config.best_of_n.prompts, config.seed)
    replies, rewards = best_of_n.sample_and_score(
        sampler, policy_params, tokenizer, scorer, gold.conversations(drawn),
        config.best_of_n.max_n, jax.random.fold_in(jax.random.key(config.seed), 7919),
        SamplingParams(config.best_of_n.temperature), progress='best-of-N samples')
    return best_of_n.curve(rewards, gold.score(drawn, replies))


def run(config, workdir: pathlib.Path) -> str:
    setup = validate(config)
    lineage = lineages.start_from(config, 'init_from', ('sft', 'rl', 'dpo'),
                               'the SFT workdir to start the reward model from', workdir)
    tokenizer, model_config = lineage.tokenizer, setup.computing(lineage.model_config)
    mesh, rules, batch_size = setup.mesh, setup.rules, config.data.batch_size
    policy_params, make_sampler = policy(config, lineage, setup)
    (train, train_stats), (val, val_stats), val_gold, labels = load_comparisons(
        config, workdir, tokenizer, make_sampler, policy_params, model_config.max_seq_len)
    data_iterator, eval_batches = batches(config, train, val)
    placement = batch_shardings(mesh, rules, batch_size)

    # --- state: resumed, or the SFT transformer with a fresh score head ----------------------
    trainable = stage.Trainable.create(lambda rngs: ScoreModel(model_config, rngs=rngs),
                                       setup.optim, mesh, rules)
    run_ = stage.Stage(config, workdir, setup)
    state = run_.start(trainable.abstract_state, trainable.shardings, tokenizer, model_config,
                       data_iterator, init=lambda: initial_state(trainable, lineage, mesh, rules,
                                                              config.seed))
    lineage.close()

    # --- compiled functions, evaluation and the loop ------------------------------------------
    reward_id = tokenizer.reward_id
    k = config.data.completions
    train_step = make_reward_step(trainable.graphdef, trainable.tx, trainable.schedule, mesh,
                                  rules, trainable.shardings, batch_size, k,
                                  accum_steps=setup.optim.accum_steps, margin=config.loss.margin)
    eval_step = make_reward_eval_step(trainable.graphdef, mesh, rules,
                                      trainable.shardings.params, batch_size, k)
    evaluate, held_out_rewards, ranks, valid = make_evaluate(config, eval_step, eval_batches,
                                                             placement, val, val_gold)
    if run_.resumed_from is None:  # the untrained head: step 0 of the curves
        run_.metrics().write(0, evaluate(state))
    seq_len = config.data.seq_len
    result = run_.train(
        state, train_step, (sharding.global_batch(b, placement) for b in data_iterator),
        data_iterator, meta=run_.meta(tokenizer, model_config, init_from=str(config.init_from),
                                      reward_token='<|reward|>'),
        evaluate=evaluate, tokens_per_step=batch_size * seq_len,
        flops_per_step=train_flops_per_token(model_config, seq_len, lm_head=False) *
        batch_size * seq_len, keep_open=True)
    if result.status == 'finished':
        # Later stages and this report use the checkpoint of the lowest held-out loss.
        best = run_.checkpointer.best_step()
        final = result.state if best in (None, result.step) else run_.checkpointer.restore(
            best, abstract_with_shardings(trainable.abstract_state, trainable.shardings))[0]
        best_of, curve_path = None, workdir / best_of_n.CURVE_FILE
        if curve_path.exists():  # the finished stage run again: its curve is measured already
            best_of = best_of_n.read_curve(curve_path)
        elif val_gold is not None and config.best_of_n.prompts:  # task-suite comparisons
            score_fn = make_score_fn(trainable.graphdef, mesh, rules, trainable.shardings.params,
                                     config.best_of_n.batch_size, reward_id)
            scorer = best_of_n.reward_scorer(score_fn, final.params, tokenizer,
                                             config.best_of_n.batch_size,
                                             min(seq_len, model_config.max_seq_len))
            start = time.perf_counter()
            best_of = best_of_n_curve(config, make_sampler(), policy_params, tokenizer, scorer)
            run_.metrics().write(int(final.step), {
                **{f'best_of_{n}/gold': v['rm'] for n, v in best_of.items()},
                'time/best_of_n': time.perf_counter() - start})
            if jax.process_index() == 0:
                write_whole(curve_path, json.dumps(best_of, indent=1) + '\n')
        final_rewards = held_out_rewards(final.params)
        if jax.process_index() == 0:
            path = reward_report.write(workdir, config, labels, train_stats, val_stats,
                                       final_rewards, ranks, valid, best_of, int(final.step))
            log.debug('report: %s', path)
    run_.close()
    return result.status
