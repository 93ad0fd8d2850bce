"""Stage 1: pretraining. Tokenizer -> tokenized mixture -> sharded state -> the shared loop ->
report.

Re-running the same command resumes from the latest checkpoint in `<workdir>/checkpoints`, with
the data iterator restored, so the resumed run sees exactly the batches an uninterrupted run
would. A checkpoint made with another tokenizer or model shape is refused.
"""

from __future__ import annotations

import logging
import pathlib
import time

import jax

from gptstack import sharding, stage
from gptstack.config import ConfigError, GPTConfig
from gptstack.data import pretrain as data
from gptstack.data.sources import specs_from_config
from gptstack.data.tokenizer import Tokenizer
from gptstack.evals import copying
from gptstack.lineage import Workdir
from gptstack.metrics import train_flops_per_token
from gptstack.model import GPT, count_params
from gptstack.reports import pretrain as pretrain_report
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import create_train_state
from gptstack.steps.lm import lm_evaluator, make_lm_eval_step, make_lm_step

log = logging.getLogger(__name__)


def model_config_for(config, tokenizer: Tokenizer, policy: dict) -> GPTConfig:
    """The model config with the tokenizer's vocabulary (a larger vocab_size pads the table),
    computing in `policy`'s dtypes."""
    values = {**config.model.to_dict(), **policy}
    if values['vocab_size'] is None:
        values['vocab_size'] = tokenizer.vocab_size
    elif values['vocab_size'] < tokenizer.vocab_size:
        raise ConfigError(f'model.vocab_size={values["vocab_size"]} is smaller than the '
                          f"tokenizer's {tokenizer.vocab_size} tokens")
    return GPTConfig.from_dict(values)


def validate(config) -> stage.Setup:
    """Every check that needs no data: sources, mesh, optimizer, loop and model shape."""
    specs_from_config(config.data.sources)
    GPTConfig.from_dict(config.model.to_dict(), vocab_size=config.model.vocab_size or 1)
    return stage.setup(config)


def load_data(config, workdir, tokenizer: Tokenizer, batch_sharding):
    """The tokenized sources, the training iterator, the fixed validation batches of each
    source and the copying evaluation's two lists of batches (`gptstack.evals.copying`; empty
    with `data.copy_batches` 0), this process's rows of every global batch."""
    cache_dir = pathlib.Path(config.data.cache_dir or workdir / 'cache')
    tokenized = [data.tokenize_source(spec, tokenizer, cache_dir,
                                      val_fraction=config.data.val_fraction,
                                      max_skips=config.data.max_skips, seed=config.seed)
                 for spec in specs_from_config(config.data.sources)]
    local_batch_size = config.data.batch_size // jax.process_count()
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    data_iterator = iter(data.make_train_dataset(tokenized, config.data.seq_len, local_batch_size,
                                                 seed=config.seed, **where))
    eval_sets = {s.spec.name: [sharding.global_batch(b, batch_sharding) for b in
                               data.make_eval_batches(s, config.data.seq_len, local_batch_size,
                                                      max_batches=config.data.eval_batches,
                                                      **where)]
                 for s in tokenized}
    copy_sets = ()
    if config.data.copy_batches:
        pool = copying.token_pool(tokenized, exclude=list(tokenizer.special_ids.values()))
        copy_sets = tuple([sharding.global_batch(b, batch_sharding) for b in batches]
                          for batches in copying.copy_batches(
                              pool, config.data.seq_len, local_batch_size,
                              batches=config.data.copy_batches, seed=config.seed,
                              bos_id=tokenizer.eot_id, **where))
    return tokenized, data_iterator, eval_sets, copy_sets


def make_sample(config, sampler: Sampler, tokenizer: Tokenizer):
    """`sample(state)`: continuations of the configured prompts, drawn fresh at each step."""
    prompts = [[tokenizer.eot_id, *tokenizer.encode(p)] for p in config.sample.prompts]
    sampling = SamplingParams(config.sample.temperature, config.sample.top_k,
                              config.sample.top_p)

    def sample(state) -> list[dict]:
        key = jax.random.fold_in(jax.random.key(config.seed), int(state.step))
        out = sampler(state.params, prompts, key, sampling)
        return [{'prompt': text, 'completion': tokenizer.decode(row[:n])}
                for text, row, n in zip(config.sample.prompts, out['tokens'], out['lengths'],
                                        strict=True)]

    return sample


def run(config, workdir: pathlib.Path) -> str:
    setup = validate(config)
    tokenizer = stage.obtain_tokenizer(config, Workdir(workdir))
    model_config = model_config_for(config, tokenizer, setup.policy)
    stage.check_seq_len(config.data.seq_len, model_config)
    tokenized, data_iterator, eval_sets, copy_sets = load_data(config, workdir, tokenizer,
                                                    setup.batch_sharding)

    # --- state: restored from the latest checkpoint, or created sharded -----------------------
    mesh, rules, batch_size = setup.mesh, setup.rules, config.data.batch_size
    trainable = stage.Trainable.create(lambda rngs: GPT(model_config, rngs=rngs), setup.optim,
                                       mesh, rules)
    run_ = stage.Stage(config, workdir, setup)
    state = run_.start(trainable.abstract_state, trainable.shardings, tokenizer, model_config,
                       data_iterator, init=lambda: create_train_state(
                           trainable.model_fn, trainable.tx, mesh, rules,
                           jax.random.key(config.seed))[1])
    n_params = count_params(trainable.abstract_state.params)
    log.info('model: %s family, %s parameters', model_config.family, f'{n_params:,}')

    # --- compiled functions and the loop ------------------------------------------------------
    train_step = make_lm_step(trainable.graphdef, trainable.tx, trainable.schedule, mesh, rules,
                              trainable.shardings, batch_size, setup.optim.accum_steps)
    eval_step = make_lm_eval_step(trainable.graphdef, mesh, rules, trainable.shardings.params,
                                  batch_size, tokenizer.token_bytes())
    sampler = Sampler(trainable.graphdef, model_config, mesh, rules,
                      batch_size=len(config.sample.prompts),
                      max_new_tokens=config.sample.max_new_tokens,
                      stop_ids=[tokenizer.eot_id], pad_id=tokenizer.pad_id,
                      vocab_size=tokenizer.vocab_size)
    tokens_per_step = batch_size * config.data.seq_len
    start_time = time.perf_counter()
    result = run_.train(
        state, train_step, (sharding.global_batch(b, setup.batch_sharding)
                            for b in data_iterator), data_iterator,
        meta=run_.meta(tokenizer, model_config),
        evaluate=lm_evaluator(eval_step, eval_sets, copy_sets),
        sample=make_sample(config, sampler, tokenizer), tokens_per_step=tokens_per_step,
        flops_per_step=train_flops_per_token(model_config, config.data.seq_len) *
        tokens_per_step)
    if run_.finished(result):
        wall_time = run_.wall_offset + time.perf_counter() - start_time
        path = pretrain_report.write(workdir, config, model_config, n_params, tokenized,
                                     tokenizer, wall_time, setup.peak_source)
        log.debug('report: %s', path)
    return result.status
