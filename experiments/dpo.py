"""Stage 3-4 in one: direct preference optimisation (DPO) from an SFT workdir
(`config.init_from`), trained straight from ranked comparisons, with no reward model and no
sampling in the loop.

Comparisons come from JSONL files in any of the layouts of `gptstack.data.preference` (the
reward stage's `comparisons/train.jsonl` and `validation.jsonl` are the natural input); the
pairs of a K-way ranking are all its ordered pairs or its best against its worst
(`loss.pairs`). Before training, the frozen SFT model's log-probability of every completion is
computed once and cached in `<workdir>/reference_logps.npz`; it travels with the data, so the
reference is never on the devices beside the policy. On several processes each reads its rows of
every batch, the log-probabilities come back whole to every process, and process 0 writes the
cache.

Evaluation: on the held-out comparisons, the loss, the implicit reward's pairwise accuracy (with
its standard error) and margin, and the policy's log-probabilities of the preferred and the
other completions; on held-out task prompts (test split), the gold score of greedy and sampled
replies and the policy's KL to the reference on its sampled replies, for the SFT policy (step 0)
and during training. For the KL the reference's parameters are read from its checkpoint at each
evaluation and dropped after it, beside the policy and its optimizer state but not the gradients
and activations of a training step. Re-running resumes exactly.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from gptstack import lineage as lineages
from gptstack import sharding, stage, stats
from gptstack.config import ConfigError
from gptstack.data import preference, tasks
from gptstack.data.sources import DataError, hold_out, read_records
from gptstack.evals import gold
from gptstack.files import write_whole
from gptstack.losses import dpo_loss, preference_pairs
from gptstack.metrics import progress_bar, train_flops_per_token
from gptstack.model import GPT
from gptstack.reports import dpo as dpo_report
from gptstack.sampling import Sampler, SamplingParams
from gptstack.steps.dpo import DPOLoss, dpo_batch_shardings, make_dpo_step, make_log_probs_fn

log = logging.getLogger(__name__)
REFERENCE_CACHE = 'reference_logps.npz'


def validate(config) -> stage.Setup:
    setup = stage.setup(config)
    DPOLoss(**config.loss)
    if not config.data.train:
        raise ConfigError('data.train: the comparison files to learn from (JSONL, e.g. '
                          '<reward workdir>/comparisons/train.jsonl)')
    return setup


def load_comparisons(config, tokenizer) -> tuple[list[dict], list[dict], preference.RenderStats]:
    """The rendered training and held-out comparisons (with reply masks)."""
    read = lambda paths: read_records(  # noqa: E731
        paths, preference.read_comparisons, 'comparisons', config.data.max_skips)
    train = read(config.data.train)
    if config.data.validation:
        val = read(config.data.validation)
    else:  # hold out a seeded fraction of the training records
        train, val = hold_out(train, config.data.val_fraction, config.seed)
    render = lambda comparisons: preference.render_comparisons(  # noqa: E731
        tokenizer, comparisons, config.data.seq_len, config.data.completions,
        truncate=config.data.truncate, with_reply_mask=True)
    train_examples, train_stats = render(train)
    val_examples, _ = render(val)
    if not train_examples:
        raise DataError(f'{config.data.train}: no training comparison has a pair (of '
                        f'{len(train)}, {train_stats.all_tied} with all completions tied)')
    if not val_examples:
        raise DataError(f'no held-out comparison has a pair (of {len(val)})')
    return train_examples, val_examples, train_stats


def batches_in_order(examples: list[dict], batch_size: int) -> list[dict]:
    """Every example once, in order, in global batches of `batch_size` (the last padded with
    empty groups): this process's rows of each."""
    local = batch_size // jax.process_count()
    return preference.make_preference_eval_batches(
        examples, local, max_batches=-(-len(examples) // batch_size),
        process_index=jax.process_index(), process_count=jax.process_count())


def fingerprint(examples: dict[str, list[dict]], lineage: lineages.Lineage) -> str:
    """What the reference log-probabilities depend on: the rendered completions and the
    reference checkpoint."""
    digest = hashlib.sha256(f'{lineage.tokenizer.sha256} {lineage.step} '
                            f'{lineage.meta.get("config", {}).get("stage")}'.encode())
    for split in sorted(examples):
        for example in examples[split]:
            digest.update(example['tokens'].tobytes())
            digest.update(example['reply_mask'].tobytes())
    return digest.hexdigest()


def attach_reference(config, workdir: pathlib.Path, examples: dict[str, list[dict]],
                     lineage: lineages.Lineage, setup: stage.Setup, model_config) -> None:
    """Puts the frozen reference's log-probability of each completion (`ref_logp [K]`) into
    every example: read from the workdir's cache when it matches these comparisons and this
    reference, else computed (then the reference's parameters are dropped) and cached."""
    path = workdir / REFERENCE_CACHE
    key = fingerprint(examples, lineage)
    cached = None
    if path.exists():
        with np.load(path) as saved:
            if str(saved['fingerprint']) == key:
                cached = {split: saved[split] for split in examples}
            else:
                log.warning('%s belongs to other comparisons or another reference: recomputing',
                            path)
    if cached is None:
        batch_size = config.data.batch_size
        graphdef, params = lineage.restore_params(GPT, setup.mesh, setup.rules,
                                                  model_config=model_config)
        log_probs = make_log_probs_fn(graphdef, setup.mesh, setup.rules,
                                      jax.tree.map(lambda x: x.sharding, params), batch_size)
        placement = {k: v for k, v in dpo_batch_shardings(setup.mesh, setup.rules,
                                                          batch_size).items() if k != 'ref_logp'}
        cached = {}
        for split, rows in examples.items():
            batches = progress_bar(batches_in_order(rows, batch_size), unit='batch',
                                   desc=f'reference log-probabilities ({split})')
            out = [sharding.to_host(log_probs(params, sharding.global_batch(b, placement)))
                   for b in batches]  # replicated: every process has every group's
            cached[split] = np.concatenate(out)[:len(rows)].astype(np.float32)
        del params
        buffer = io.BytesIO()
        np.savez(buffer, fingerprint=np.asarray(key), **cached)
        if jax.process_index() == 0:
            write_whole(path, buffer.getvalue())
        log.info('reference log-probabilities of %s completion groups cached in %s',
                 ' and '.join(f'{len(v):,} {k}' for k, v in cached.items()), path)
    for split, rows in examples.items():
        for example, ref_logp in zip(rows, cached[split], strict=True):
            example['ref_logp'] = ref_logp


def make_evaluate(config, loss: DPOLoss, log_probs, eval_batches: list[dict], placement,
                  sampler: Sampler, tokenizer, held_out: list[tasks.Task],
                  restore_reference: Callable[[], object]):
    """`evaluate(state)`: the DPO metrics of the held-out comparisons, and the gold score of the
    policy's greedy and sampled replies to held-out task prompts (the same draws each time) with
    its KL to the reference (`restore_reference()`: its parameters) on the sampled replies."""
    # `eval_batches` are whole global batches: each process puts its rows on the devices, and
    # the log-probabilities come back whole (replicated) to be compared with the host's.
    local = len(eval_batches[0]['ranks']) // jax.process_count()
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    device_batches = [sharding.global_batch({k: v[mine] for k, v in b.items() if k != 'ref_logp'},
                                            placement) for b in eval_batches]
    ref_logp, ranks, valid = (np.concatenate([b[k] for b in eval_batches])
                              for k in ('ref_logp', 'ranks', 'valid'))
    pairs = np.asarray(preference_pairs(ranks, valid, loss.pairs))
    modes = {'greedy': SamplingParams(temperature=0.0),
             'sampled': SamplingParams(temperature=config.eval.temperature)}

    def evaluate(state) -> dict:
        logp = np.concatenate([np.asarray(jax.device_get(log_probs(state.params, b)))
                               for b in device_batches])
        loss_sum, count, sums = jax.device_get(dpo_loss(logp, ref_logp, pairs, loss.beta,
                                                        loss.kind, loss.label_smoothing))
        # Each group's share of correct pairs: the accuracy's standard error over groups.
        rewards = logp - ref_logp
        h = rewards[:, :, None] - rewards[:, None, :]
        correct = ((h > 0) + 0.5 * (h == 0)) * pairs  # a tie counts half
        per_group = pairs.sum(axis=(1, 2))
        has = per_group > 0
        accuracy, accuracy_stderr = stats.mean_and_stderr(
            correct.sum(axis=(1, 2))[has] / per_group[has])
        n = max(float(sums['pairs']), 1.0)
        metrics = {'val_loss': float(loss_sum) / max(float(count), 1.0),
                   'val_accuracy': accuracy, 'val_accuracy_stderr': accuracy_stderr,
                   'val_margin': float(sums['margin']) / n,
                   'val_chosen_logp': float(sums['chosen']) / n,
                   'val_rejected_logp': float(sums['rejected']) / n}
        if held_out:
            metrics.update(gold.modes_summary(sampler, state.params, tokenizer, held_out,
                                              jax.random.key(config.seed + 1), modes,
                                              reference=restore_reference()))
        return metrics

    return evaluate


def run(config, workdir: pathlib.Path) -> str:
    setup = validate(config)
    loss = DPOLoss(**config.loss)
    sft = lineages.start_from(config, 'init_from', ('sft', 'rl', 'dpo'),
                           'the SFT workdir the policy starts from', workdir)
    tokenizer, model_config = sft.tokenizer, setup.computing(sft.model_config)
    stage.check_seq_len(config.data.seq_len, model_config, 'the SFT model')
    mesh, rules, batch_size = setup.mesh, setup.rules, config.data.batch_size
    train, val, train_stats = load_comparisons(config, tokenizer)
    # The evaluation reads the first `eval_batches` batches of held-out groups: the reference
    # scores only those.
    val = val[:config.data.eval_batches * batch_size]
    attach_reference(config, workdir, {'train': train, 'validation': val}, sft, setup,
                     model_config)
    # Each process reads its rows of every global batch, as the reward stage does.
    data_iterator = iter(preference.make_preference_dataset(
        train, batch_size // jax.process_count(), seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count()))
    eval_batches = preference.make_preference_eval_batches(val, batch_size,
                                                           max_batches=config.data.eval_batches)
    placement = dpo_batch_shardings(mesh, rules, batch_size)

    # --- state: resumed, or the SFT weights with a fresh optimizer ----------------------------
    trainable = stage.Trainable.create(lambda rngs: GPT(model_config, rngs=rngs), setup.optim,
                                       mesh, rules)
    run_ = stage.Stage(config, workdir, setup)
    state = run_.start(trainable.abstract_state, trainable.shardings, tokenizer, model_config,
                       data_iterator, init=lambda: trainable.from_params(
                           sft.restore_params(GPT, mesh, rules)[1]))

    # --- compiled functions, evaluation and the loop ------------------------------------------
    train_step = make_dpo_step(trainable.graphdef, trainable.tx, trainable.schedule, mesh,
                               rules, trainable.shardings, batch_size, loss,
                               accum_steps=setup.optim.accum_steps)
    log_probs = make_log_probs_fn(trainable.graphdef, mesh, rules, trainable.shardings.params,
                                  batch_size)
    sampler = Sampler(trainable.graphdef, model_config, mesh, rules,
                      batch_size=config.eval.batch_size,
                      max_new_tokens=config.eval.max_new_tokens,
                      stop_ids=[tokenizer.end_of_turn_id, tokenizer.eot_id],
                      pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    held_out = tasks.generate('test', config.eval.gold_prompts, config.seed) \
        if config.eval.gold_prompts else []
    evaluate = make_evaluate(
        config, loss, log_probs, eval_batches,
        {k: v for k, v in placement.items() if k != 'ref_logp'}, sampler, tokenizer, held_out,
        restore_reference=lambda: sft.restore_params(GPT, mesh, rules,
                                                     model_config=model_config)[1])
    if run_.resumed_from is None:  # the SFT policy: step 0 of the curves
        run_.metrics().write(0, evaluate(state))
    k, seq_len = config.data.completions, config.data.seq_len
    result = run_.train(
        state, train_step, (sharding.global_batch(b, placement) for b in data_iterator),
        data_iterator, meta=run_.meta(tokenizer, model_config, init_from=str(config.init_from)),
        evaluate=evaluate, tokens_per_step=batch_size * k * seq_len,
        flops_per_step=train_flops_per_token(model_config, seq_len) * batch_size * k * seq_len)
    sft.close()
    if run_.finished(result) and jax.process_index() == 0:
        log.debug('report: %s', dpo_report.write(workdir, config, train_stats, len(train),
                                                len(val)))
    return result.status
