"""Stage 2: supervised finetuning from a pretraining workdir (`config.init_from`).

The model, tokenizer and weights come from the latest checkpoint of `init_from` (its tokenizer
sha256 and model config are checked); the optimizer starts fresh. Conversations come from the
embedded task suite (`data.train='embedded:tasks'`) or JSONL files, and the loss counts only the
assistant's tokens. Evaluation: validation loss on assistant tokens and, for the task suite, the
gold score of greedy and sampled answers to held-out prompts, measured for the base model before
the first step too. Re-running resumes like pretraining.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from experiments import pretrain as pretrain_stage
from gptstack import loop, report, sharding, workdirs
from gptstack.chat import sample_replies
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import ConfigError
from gptstack.data import sft as sft_data
from gptstack.data import tasks
from gptstack.data.sources import SkipBudget, expand_paths
from gptstack.data.tokenizer import render_prompt
from gptstack.metrics import MetricsWriter, read_metrics, train_flops_per_token, truncate_jsonl
from gptstack.model import GPT
from gptstack.optim import make_optimizer
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import TrainState, abstract_model, abstract_train_state, state_shardings
from gptstack.steps.lm import make_lm_eval_step, make_lm_step

log = logging.getLogger(__name__)
EMBEDDED_TASKS = 'embedded:tasks'


def conversations(config, split: str):
    """`(location, messages)` pairs and, for the task suite, the tasks themselves."""
    data = config.data
    paths = data.train if split == 'train' else data.validation
    if paths == EMBEDDED_TASKS:
        n = data.train_tasks if split == 'train' else data.validation_tasks
        drawn = tasks.generate('train' if split == 'train' else 'validation', n, config.seed)
        return [(f'task {split} {i}', t.messages()) for i, t in enumerate(drawn)], drawn
    budget = SkipBudget(data.max_skips)
    pairs = [pair for pattern in paths.split(',')
             for path in expand_paths((pattern.strip(),), f'sft {split}')
             for pair in sft_data.read_conversations(path, budget,
                                                     prompt_field=data.prompt_field,
                                                     response_field=data.response_field)]
    if budget.skipped:
        log.warning('%s: skipped %d malformed records %s', split, budget.skipped,
                    dict(budget.by_reason))
    return pairs, None


def gold_scores(sampler, params, tokenizer, held_out, key, sampling) -> tuple[float, float]:
    """Mean gold score of the answers to `held_out` tasks and its standard error."""
    replies = sample_replies(sampler, params, tokenizer,
                             [t.messages(with_answer=False) for t in held_out], key, sampling)
    values = np.asarray([tasks.score(t, r) for t, (r,) in zip(held_out, replies, strict=True)])
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def run(config, workdir: pathlib.Path) -> str:
    # --- configs, mesh, base model: every check before expensive work ------------------------
    setup = pretrain_stage.setup(config)
    mesh, rules = setup.mesh, setup.rules
    tokenizer, model_config, base_checkpointer, base_step = workdirs.load_base(
        config.init_from)
    seq_len, global_batch_size = config.data.seq_len, config.data.batch_size
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f'data.seq_len={seq_len} exceeds the base model\'s max_seq_len='
                          f'{model_config.max_seq_len}')
    shutil.copyfile(pathlib.Path(config.init_from) / 'tokenizer.model',
                    workdir / 'tokenizer.model')

    # --- data ---------------------------------------------------------------------------------
    train_pairs, _ = conversations(config, 'train')
    if config.data.validation:
        val_pairs, val_tasks = conversations(config, 'validation')
    else:  # hold out a seeded fraction of the training records
        order = np.random.default_rng(config.seed).permutation(len(train_pairs))
        n_val = max(1, round(config.data.val_fraction * len(train_pairs)))
        val_pairs = [train_pairs[i] for i in sorted(order[:n_val])]
        train_pairs = [train_pairs[i] for i in sorted(order[n_val:])]
        val_tasks = None
    budget = SkipBudget(config.data.max_skips)
    train_examples, train_stats = sft_data.render_examples(
        tokenizer, train_pairs, seq_len, truncate=config.data.truncate, budget=budget)
    val_examples, _ = sft_data.render_examples(tokenizer, val_pairs, seq_len,
                                               truncate=config.data.truncate, budget=budget)
    processes, index = jax.process_count(), jax.process_index()
    local_batch = global_batch_size // processes
    data_iterator = iter(sft_data.make_sft_dataset(train_examples, seq_len, local_batch,
                                                   seed=config.seed, process_index=index,
                                                   process_count=processes))
    eval_batches = [sharding.global_batch(b, setup.batch_sharding) for b in
                    sft_data.make_sft_eval_batches(val_examples, seq_len, local_batch,
                                                   max_batches=config.data.eval_batches,
                                                   process_index=index, process_count=processes)]

    # --- state: resumed, or the base weights with a fresh optimizer ---------------------------
    tx, schedule = make_optimizer(setup.optim)
    model_fn = lambda rngs: GPT(model_config, rngs=rngs)  # noqa: E731
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
        params = base_checkpointer.restore_params(
            base_step, abstract_with_shardings(abstract_state.params, shardings.params))
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                             opt_state=tx.init(p)),
                        out_shardings=shardings)(params)
        wall_offset = 0.0
    base_checkpointer.close()

    # --- compiled functions and evaluation ----------------------------------------------------
    train_step = make_lm_step(graphdef, tx, schedule, mesh, rules, shardings, global_batch_size,
                              setup.optim.accum_steps)
    eval_step = make_lm_eval_step(graphdef, mesh, rules, shardings.params, global_batch_size,
                                  tokenizer.token_bytes())
    evaluate_loss = pretrain_stage.make_evaluate(eval_step, {'assistant': eval_batches})
    shards = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
    sampler = Sampler(graphdef, model_config, mesh, rules,
                      batch_size=shards * math.ceil(config.eval.batch_size / shards),
                      max_new_tokens=config.eval.max_new_tokens,
                      stop_ids=[tokenizer.end_of_turn_id, tokenizer.eot_id],
                      pad_id=tokenizer.pad_id)
    held_out = (val_tasks or [])[:config.eval.gold_prompts]
    modes = {'greedy': SamplingParams(temperature=0.0),
             'sampled': SamplingParams(temperature=config.eval.temperature)}

    def evaluate(state) -> dict:
        metrics = evaluate_loss(state)
        key = jax.random.fold_in(jax.random.key(config.seed), int(state.step))
        for name, sampling in modes.items():
            if held_out:
                mean, stderr = gold_scores(sampler, state.params, tokenizer, held_out, key,
                                           sampling)
                metrics[f'gold/{name}'], metrics[f'gold/{name}_stderr'] = mean, stderr
        return metrics

    writer = MetricsWriter(workdir, resume_step=latest)
    if latest is None:  # the base model's scores: step 0 of the curves
        writer.write(0, evaluate(state))

    def sample(state) -> list[dict]:
        chosen = held_out[:4]
        prompts = [render_prompt(tokenizer, t.messages(with_answer=False)) for t in chosen]
        out = sampler(state.params, prompts, jax.random.key(config.seed), modes['greedy'])
        return [{'prompt': t.prompt, 'completion': tokenizer.decode(row[:n]),
                 'gold': t.answer} for t, row, n in zip(chosen, out['tokens'], out['lengths'],
                                                         strict=True)]

    truncate_jsonl(workdir / 'samples.jsonl', latest or 0)
    tokens_per_step = global_batch_size * seq_len
    meta = {'model': dataclasses.asdict(model_config), 'tokenizer_sha256': tokenizer.sha256,
            'seed': config.seed, 'config': config.to_dict(), 'init_from': str(config.init_from)}
    result = loop.train(
        state=state, step_fn=train_step,
        batches=(sharding.global_batch(b, setup.batch_sharding) for b in data_iterator),
        data_iterator=data_iterator, config=setup.loop, checkpointer=checkpointer,
        writer=writer, workdir=workdir, evaluate=evaluate, sample=sample if held_out else None,
        checkpoint_meta=meta, tokens_per_step=tokens_per_step,
        flops_per_step=train_flops_per_token(model_config, seq_len) * tokens_per_step,
        peak_flops=setup.peak_flops, wall_time_offset=wall_offset)
    writer.close()
    checkpointer.close()
    if result.status == 'finished' and jax.process_index() == 0:
        path = write_report(workdir, config, train_stats, len(train_examples),
                            len(val_examples))
        log.info('report: %s', path)
    return result.status


def write_report(workdir, config, train_stats, n_train, n_val) -> str:
    records = read_metrics(workdir)
    evals = [r for r in records if 'val_loss' in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    rows = [(name, first.get(f'gold/{name}', 'n/a'), first.get(f'gold/{name}_stderr', 'n/a'),
             last.get(f'gold/{name}', 'n/a'), last.get(f'gold/{name}_stderr', 'n/a'))
            for name in ('greedy', 'sampled')]
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
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        ('Greedy answers at the last evaluation', report.code_block('\n'.join(samples))),
    ])
