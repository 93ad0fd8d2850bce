"""Stage 2: supervised finetuning from a pretraining workdir (`config.init_from`).

The model, tokenizer and weights come from the latest checkpoint of `init_from` (its tokenizer
sha256 and model config are checked); the optimizer starts fresh. Conversations come from the
embedded task suite (`data.train='embedded:tasks'`) or JSONL files, and the loss counts only the
assistant's tokens. Evaluation: validation loss on assistant tokens and, for the task suite, the
gold score of greedy and sampled answers to held-out prompts, measured for the base model before
the first step too. Re-running resumes like pretraining.
"""

from __future__ import annotations

import functools
import logging
import pathlib

import jax

from gptstack import sharding, stage
from gptstack.config import ConfigError
from gptstack.data import sft as sft_data
from gptstack.data import tasks
from gptstack.data.sources import DataError, SkipBudget, hold_out, read_records
from gptstack.data.tokenizer import render_prompt
from gptstack.evals import gold
from gptstack.lineage import start_from
from gptstack.metrics import train_flops_per_token
from gptstack.model import GPT
from gptstack.reports import sft as sft_report
from gptstack.sampling import Sampler, SamplingParams
from gptstack.steps.lm import lm_evaluator, make_lm_eval_step, make_lm_step

log = logging.getLogger(__name__)
# The kinds of run SFT may start from: a base model, or an assistant to finetune further.
STARTS_FROM = ('pretrain', 'sft', 'rl', 'dpo')


def validate(config) -> stage.Setup:
    setup = stage.setup(config)
    if config.data.copy_drills and config.data.train != tasks.EMBEDDED_TASKS:
        raise ConfigError(f'data.copy_drills={config.data.copy_drills}: copy drills join the '
                          f'embedded task suite, not data.train={config.data.train!r} (set '
                          'data.copy_drills=0)')
    return setup


def conversations(config, split: str):
    """`(location, messages)` pairs and, for the task suite, the tasks themselves."""
    data = config.data
    paths = data.train if split == 'train' else data.validation
    if paths == tasks.EMBEDDED_TASKS:
        n = data.train_tasks if split == 'train' else data.validation_tasks
        drawn = tasks.generate('train' if split == 'train' else 'validation', n, config.seed)
        return [(f'task {split} {i}', t.messages()) for i, t in enumerate(drawn)], drawn
    reader = functools.partial(sft_data.read_conversations, prompt_field=data.prompt_field,
                               response_field=data.response_field)
    return read_records(paths, reader, f'sft {split} conversations', data.max_skips), None


def load_data(config, tokenizer, batch_sharding):
    """Rendered training and validation conversations, the training iterator, the validation
    batches, and the held-out tasks (None for JSONL data)."""
    train_pairs, _ = conversations(config, 'train')
    if config.data.validation:
        val_pairs, val_tasks = conversations(config, 'validation')
    else:  # hold out a seeded fraction of the training records
        (train_pairs, val_pairs), val_tasks = hold_out(train_pairs, config.data.val_fraction,
                                                       config.seed), None
    # Copy drills train only (never held out); the training stream's shuffle mixes them in.
    drills = tasks.copy_drills(config.data.copy_drills, config.seed)
    train_pairs += [(f'copy drill {i}', t.messages()) for i, t in enumerate(drills)]
    budget = SkipBudget(config.data.max_skips)
    seq_len, truncate = config.data.seq_len, config.data.truncate
    train, train_stats = sft_data.render_examples(tokenizer, train_pairs, seq_len,
                                                  truncate=truncate, budget=budget)
    val, _ = sft_data.render_examples(tokenizer, val_pairs, seq_len, truncate=truncate,
                                      budget=budget)
    if budget.skipped:
        log.warning('SFT conversations: skipped %d malformed records %s', budget.skipped,
                    dict(budget.by_reason))
    for name, rendered, pairs in (('training', train, train_pairs), ('validation', val, val_pairs)):
        if not rendered:
            raise DataError(f'SFT has no {name} conversation to use ({len(pairs)} read; '
                            f'data.train={config.data.train}, data.validation='
                            f'{config.data.validation or "a held-out fraction"})')
    local_batch = config.data.batch_size // jax.process_count()
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    data_iterator = iter(sft_data.make_sft_dataset(train, seq_len, local_batch,
                                                   seed=config.seed, **where))
    eval_batches = [sharding.global_batch(b, batch_sharding) for b in
                    sft_data.make_sft_eval_batches(val, seq_len, local_batch,
                                                   max_batches=config.data.eval_batches, **where)]
    return (train, val, train_stats), data_iterator, eval_batches, val_tasks


def make_evaluate(config, evaluate_loss, sampler: Sampler, tokenizer, held_out):
    """`evaluate(state)`: the validation loss and the gold score of greedy and sampled answers
    to the held-out tasks, overall and by task level (each mode's draws fixed by the step)."""
    modes = {'greedy': SamplingParams(temperature=0.0),
             'sampled': SamplingParams(temperature=config.eval.temperature)}

    def evaluate(state) -> dict:
        metrics = evaluate_loss(state)
        if held_out:
            key = jax.random.fold_in(jax.random.key(config.seed), int(state.step))
            metrics.update(gold.modes_summary(sampler, state.params, tokenizer, held_out, key,
                                              modes))
        return metrics

    def sample(state) -> list[dict]:
        chosen = held_out[:4]
        prompts = [render_prompt(tokenizer, t.messages(with_answer=False)) for t in chosen]
        out = sampler(state.params, prompts, jax.random.key(config.seed), modes['greedy'])
        return [{'prompt': t.prompt, 'completion': tokenizer.decode(row[:n]),
                 'gold': t.answer} for t, row, n in zip(chosen, out['tokens'], out['lengths'],
                                                         strict=True)]

    return evaluate, sample if held_out else None


def run(config, workdir: pathlib.Path) -> str:
    setup = validate(config)
    base = start_from(config, 'init_from', STARTS_FROM,
                            'the pretraining workdir to finetune', workdir)
    tokenizer, model_config = base.tokenizer, setup.computing(base.model_config)
    stage.check_seq_len(config.data.seq_len, model_config, 'the base model')
    (train, val, train_stats), data_iterator, eval_batches, val_tasks = load_data(
        config, tokenizer, setup.batch_sharding)

    # --- state: resumed, or the base weights with a fresh optimizer ---------------------------
    mesh, rules, batch_size = setup.mesh, setup.rules, config.data.batch_size
    trainable = stage.Trainable.create(lambda rngs: GPT(model_config, rngs=rngs), setup.optim,
                                       mesh, rules)
    run_ = stage.Stage(config, workdir, setup)
    state = run_.start(trainable.abstract_state, trainable.shardings, tokenizer, model_config,
                       data_iterator, init=lambda: trainable.from_params(
                           base.restore_params(GPT, mesh, rules)[1]))
    base.close()

    # --- compiled functions, evaluation and the loop ------------------------------------------
    train_step = make_lm_step(trainable.graphdef, trainable.tx, trainable.schedule, mesh, rules,
                              trainable.shardings, batch_size, setup.optim.accum_steps)
    eval_step = make_lm_eval_step(trainable.graphdef, mesh, rules, trainable.shardings.params,
                                  batch_size, tokenizer.token_bytes())
    sampler = Sampler(trainable.graphdef, model_config, mesh, rules,
                      batch_size=config.eval.batch_size,
                      max_new_tokens=config.eval.max_new_tokens,
                      stop_ids=[tokenizer.end_of_turn_id, tokenizer.eot_id],
                      pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    evaluate, sample = make_evaluate(
        config, lm_evaluator(eval_step, {'assistant': eval_batches}), sampler, tokenizer,
        (val_tasks or [])[:config.eval.gold_prompts])
    if run_.resumed_from is None:  # the base model's scores: step 0 of the curves
        run_.metrics().write(0, evaluate(state))
    tokens_per_step = batch_size * config.data.seq_len
    result = run_.train(
        state, train_step, (sharding.global_batch(b, setup.batch_sharding)
                            for b in data_iterator), data_iterator,
        meta=run_.meta(tokenizer, model_config, init_from=str(config.init_from)),
        evaluate=evaluate, sample=sample, tokens_per_step=tokens_per_step,
        flops_per_step=train_flops_per_token(model_config, config.data.seq_len) *
        tokens_per_step)
    if run_.finished(result):
        log.debug('report: %s', sft_report.write(workdir, config, train_stats, len(train),
                                                len(val)))
    return result.status
