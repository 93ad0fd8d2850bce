"""Stage 1: pretraining. Tokenizer -> tokenized mixture -> sharded state -> the shared loop ->
report.

Re-running the same command resumes from the latest checkpoint in `<workdir>/checkpoints`, with
the data iterator restored, so the resumed run sees exactly the batches an uninterrupted run
would. A checkpoint made with another tokenizer or model shape is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time

import jax
import numpy as np

from experiments import tokenizer as tokenizer_stage
from gptstack import loop, report, sharding
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import COMPUTE_FIELDS, ConfigError, GPTConfig, MeshConfig, OptimConfig
from gptstack.data import pretrain as data
from gptstack.data.sources import specs_from_config
from gptstack.data.tokenizer import Tokenizer
from gptstack.metrics import (
    MetricsWriter,
    peak_flops_per_device,
    read_metrics,
    train_flops_per_token,
    truncate_jsonl,
)
from gptstack.model import GPT, count_params
from gptstack.optim import make_optimizer
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import abstract_model, abstract_train_state, create_train_state, state_shardings
from gptstack.steps.lm import make_lm_eval_step, make_lm_step

log = logging.getLogger(__name__)


def model_config_for(config, tokenizer: Tokenizer) -> GPTConfig:
    """The model config with the tokenizer's vocabulary (a larger vocab_size pads the table)."""
    values = config.model.to_dict()
    if values['vocab_size'] is None:
        values['vocab_size'] = tokenizer.vocab_size
    elif values['vocab_size'] < tokenizer.vocab_size:
        raise ConfigError(f'model.vocab_size={values["vocab_size"]} is smaller than the '
                          f"tokenizer's {tokenizer.vocab_size} tokens")
    return GPTConfig.from_dict(values)


def check_compatible(meta: dict, tokenizer: Tokenizer, model_config: GPTConfig, where) -> None:
    """Refuses a checkpoint trained with another tokenizer or model shape. The saved config is
    read back as a `GPTConfig` (fields it predates take their defaults), and the compute policy
    (`COMPUTE_FIELDS`) may differ."""
    if meta.get('tokenizer_sha256') != tokenizer.sha256:
        raise ConfigError(f'{where} was trained with tokenizer sha256 '
                          f'{meta.get("tokenizer_sha256")}, but this run uses {tokenizer.sha256}')
    if 'model' not in meta:
        raise ConfigError(f'{where} records no model config')
    saved = dataclasses.asdict(GPTConfig.from_dict(meta['model']))
    current = dataclasses.asdict(model_config)
    diff = sorted(k for k in current if k not in COMPUTE_FIELDS and saved[k] != current[k])
    if diff:
        raise ConfigError(f'{where} has a different model config: ' + ', '.join(
            f'{k}={saved[k]!r} there vs {current[k]!r} here' for k in diff))


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every training stage derives from its config before doing any work."""

    mesh: jax.sharding.Mesh
    rules: str
    optim: OptimConfig
    loop: loop.LoopConfig
    batch_sharding: jax.sharding.NamedSharding
    peak_flops: float
    peak_source: str


def setup(config) -> Setup:
    """Validates the mesh, optimizer, loop and batch settings (cheap; fails with the key)."""
    mesh_config = MeshConfig.from_dict(config.mesh)
    optim_config = OptimConfig.from_dict(config.optim)
    loop_config = loop.LoopConfig(**{k: v for k, v in config.train.items()
                                     if k != 'keep_checkpoints'})
    mesh = sharding.make_mesh(mesh_config)
    if config.data.batch_size % jax.process_count():
        raise ConfigError(f'data.batch_size={config.data.batch_size} must divide over the '
                          f'{jax.process_count()} processes')
    batch_sharding = sharding.batch_sharding(mesh, mesh_config.rules, config.data.batch_size)
    log.info('mesh: %s, rules %s', sharding.describe(mesh), mesh_config.rules)
    # MFU is against the peak of the dtype the matmuls run in.
    model = config.get('model', {})
    peak, source = peak_flops_per_device(model.get('matmul_dtype') or model.get('dtype', 'float32'))
    return Setup(mesh, mesh_config.rules, optim_config, loop_config, batch_sharding,
                 peak * jax.device_count(), source)


def make_evaluate(eval_step, eval_sets: dict[str, list]):
    """`evaluate(state) -> {val/<name>/loss, val/<name>/bpb, val_loss, val_bpb}` over fixed
    batches; the totals weigh every counted token equally."""
    def evaluate(state) -> dict:
        metrics, totals = {}, np.zeros(3)
        for name, batches in eval_sets.items():
            sums = np.zeros(3)
            for batch in batches:
                out = jax.device_get(eval_step(state.params, batch))
                sums += [out['loss_sum'], out['count'], out['bytes']]
            metrics[f'val/{name}/loss'] = sums[0] / sums[1]
            metrics[f'val/{name}/bpb'] = sums[0] / (math.log(2) * sums[2])
            totals += sums
        metrics['val_loss'] = totals[0] / totals[1]
        metrics['val_bpb'] = totals[0] / (math.log(2) * totals[2])
        return metrics

    return evaluate


def resume(checkpointer: Checkpointer, abstract_state, shardings, tokenizer: Tokenizer,
           model_config: GPTConfig, data_iterator):
    """`(state, wall time so far)` from the run's latest checkpoint, restored onto `shardings`
    with the data iterator, or None for a fresh run. A checkpoint of another tokenizer or model
    shape is refused."""
    latest = checkpointer.latest_step()
    if latest is None:
        return None
    check_compatible(checkpointer.read_meta(latest), tokenizer, model_config,
                     checkpointer.path(latest))
    state, meta = checkpointer.restore(latest, abstract_with_shardings(abstract_state, shardings),
                                       data_iterator=data_iterator)
    log.info('resuming from %s (step %d)', checkpointer.path(latest), latest)
    return state, meta.get('wall_time', 0.0)


def run(config, workdir: pathlib.Path) -> str:
    # --- configs and mesh: every check that can fail does so before any expensive work --------
    specs = specs_from_config(config.data.sources)
    setup_ = setup(config)
    mesh, rules, batch_sharding = setup_.mesh, setup_.rules, setup_.batch_sharding
    global_batch_size, seq_len = config.data.batch_size, config.data.seq_len
    processes = jax.process_count()

    # --- tokenizer and data -------------------------------------------------------------------
    tokenizer = tokenizer_stage.obtain(config, workdir)
    model_config = model_config_for(config, tokenizer)
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f'data.seq_len={seq_len} exceeds model.max_seq_len='
                          f'{model_config.max_seq_len}')
    cache_dir = pathlib.Path(config.data.cache_dir or workdir / 'cache')
    tokenized = [data.tokenize_source(spec, tokenizer, cache_dir,
                                      val_fraction=config.data.val_fraction,
                                      max_skips=config.data.max_skips, seed=config.seed)
                 for spec in specs]
    local_batch_size = global_batch_size // processes
    data_iterator = iter(data.make_train_dataset(
        tokenized, seq_len, local_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=processes))
    eval_sets = {s.spec.name: [sharding.global_batch(b, batch_sharding) for b in
                               data.make_eval_batches(s, seq_len, local_batch_size,
                                                      max_batches=config.data.eval_batches,
                                                      process_index=jax.process_index(),
                                                      process_count=processes)]
                 for s in tokenized}

    # --- state: restored from the latest checkpoint, or created sharded -----------------------
    tx, schedule = make_optimizer(setup_.optim)
    model_fn = lambda rngs: GPT(model_config, rngs=rngs)  # noqa: E731
    graphdef, abstract_params = abstract_model(model_fn)
    abstract_state = abstract_train_state(model_fn, tx)
    shardings = state_shardings(abstract_state, mesh, rules, tx)
    checkpointer = Checkpointer(workdir / 'checkpoints', keep=config.train.keep_checkpoints)
    latest = checkpointer.latest_step()
    resumed = resume(checkpointer, abstract_state, shardings, tokenizer, model_config,
                     data_iterator)
    if resumed:
        state, wall_offset = resumed
    else:
        _, state, _ = create_train_state(model_fn, tx, mesh, rules, jax.random.key(config.seed))
        wall_offset = 0.0
    n_params = count_params(abstract_params)
    log.info('model: %s family, %s parameters', model_config.family, f'{n_params:,}')

    # --- compiled functions -------------------------------------------------------------------
    train_step = make_lm_step(graphdef, tx, schedule, mesh, rules, shardings,
                                    global_batch_size, setup_.optim.accum_steps)
    eval_step = make_lm_eval_step(graphdef, mesh, rules, shardings.params, global_batch_size,
                               tokenizer.token_bytes())
    shards = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
    prompts = [[tokenizer.eot_id, *tokenizer.encode(p)] for p in config.sample.prompts]
    sampler = Sampler(graphdef, model_config, mesh, rules,
                      batch_size=shards * math.ceil(len(prompts) / shards),
                      max_new_tokens=config.sample.max_new_tokens,
                      stop_ids=[tokenizer.eot_id], pad_id=tokenizer.pad_id)
    sampling = SamplingParams(config.sample.temperature, config.sample.top_k,
                              config.sample.top_p)

    evaluate = make_evaluate(eval_step, eval_sets)

    def sample(state) -> list[dict]:
        key = jax.random.fold_in(jax.random.key(config.seed), int(state.step))
        out = sampler(state.params, prompts, key, sampling)
        return [{'prompt': text, 'completion': tokenizer.decode(row[:n])}
                for text, row, n in zip(config.sample.prompts, out['tokens'], out['lengths'],
                                        strict=True)]

    # --- the loop -----------------------------------------------------------------------------
    writer = MetricsWriter(workdir, resume_step=latest)
    truncate_jsonl(workdir / 'samples.jsonl', latest or 0)
    tokens_per_step = global_batch_size * seq_len
    start_time = time.perf_counter()
    meta = {'model': dataclasses.asdict(model_config), 'tokenizer_sha256': tokenizer.sha256,
            'seed': config.seed, 'config': config.to_dict()}
    result = loop.train(
        state=state, step_fn=train_step,
        batches=(sharding.global_batch(b, batch_sharding) for b in data_iterator),
        data_iterator=data_iterator, config=setup_.loop, checkpointer=checkpointer,
        writer=writer, workdir=workdir, evaluate=evaluate, sample=sample,
        checkpoint_meta=meta, tokens_per_step=tokens_per_step,
        flops_per_step=train_flops_per_token(model_config, seq_len) * tokens_per_step,
        peak_flops=setup_.peak_flops, wall_time_offset=wall_offset)
    writer.close()
    checkpointer.close()
    if result.status == 'finished' and jax.process_index() == 0:
        path = write_report(workdir, config, model_config, n_params, tokenized, tokenizer,
                            wall_offset + time.perf_counter() - start_time, setup_.peak_source)
        log.info('report: %s', path)
    return result.status


def write_report(workdir, config, model_config, n_params, tokenized, tokenizer, wall_time,
                 peak_source) -> str:
    records = read_metrics(workdir)
    train = [r for r in records if 'loss' in r]
    evals = [r for r in records if 'val_loss' in r]
    entropy = data.unigram_entropy(tokenized, model_config.vocab_size)
    last_eval = evals[-1] if evals else {}
    steps = train[-1]['step'] if train else 0
    tokens = steps * config.data.batch_size * config.data.seq_len
    throughput = [r['tokens_per_sec'] for r in train if 'tokens_per_sec' in r]
    mfu = [r['mfu'] for r in train if 'mfu' in r]
    val_series = {'validation (all)': 'val_loss'}
    val_series.update({f'validation {s.spec.name}': f'val/{s.spec.name}/loss' for s in tokenized})
    plots = [
        report.plot(records, {'train': 'loss', **val_series}, workdir / 'loss.png',
                    title='Loss', ylabel='nats per token',
                    hlines={f'unigram entropy {entropy:.2f}': entropy}),
        report.plot(records, {'learning rate': 'lr'}, workdir / 'lr.png',
                    title='Learning rate', ylabel='lr'),
        report.plot(records, {'tokens/s': 'tokens_per_sec'}, workdir / 'throughput.png',
                    title='Training throughput', ylabel='tokens per second'),
    ]
    summary = [
        ('model', f'{model_config.family}, {model_config.n_layer} layers, d_model '
                  f'{model_config.d_model}, {model_config.n_head} heads, {n_params:,} parameters'),
        ('tokenizer', f'{tokenizer.vocab_size} tokens, sha256 {tokenizer.sha256[:16]}…'),
        ('steps × batch × sequence', f'{steps} × {config.data.batch_size} × '
                                     f'{config.data.seq_len} = {tokens:,} tokens'),
        ('wall time', f'{wall_time / 60:.1f} min'),
        ('final train loss', train[-1]['loss'] if train else 'n/a'),
        ('final validation loss', last_eval.get('val_loss', 'n/a')),
        ('validation bits per byte', last_eval.get('val_bpb', 'n/a')),
        ('unigram entropy of the training mixture', entropy),
        ('median tokens/s', float(np.median(throughput)) if throughput else 'n/a'),
        ('median MFU', f'{np.median(mfu):.1%} ({peak_source})' if mfu else 'n/a'),
    ]
    sources_rows = [(s.spec.name, s.spec.weight, s.meta['documents'], s.meta['train_tokens'],
                     s.meta['val_tokens'], s.meta['split'], sum(s.meta['skipped'].values()),
                     last_eval.get(f'val/{s.spec.name}/loss', 'n/a'),
                     last_eval.get(f'val/{s.spec.name}/bpb', 'n/a'))
                    for s in tokenized]
    samples = [json.loads(line) for line in (workdir / 'samples.jsonl').read_text().splitlines()
               if line] if (workdir / 'samples.jsonl').exists() else []
    final = [s for s in samples if s['step'] == steps] or samples[-len(config.sample.prompts):]
    sample_text = '\n\n'.join(report.code_block(s['prompt'] + s['completion']) for s in final)
    return report.write(workdir, 'Pretraining report', [
        ('Summary', report.table(['', ''], summary)),
        ('Data mixture', report.table(
            ['source', 'weight', 'documents', 'train tokens', 'val tokens', 'held out',
             'skipped', 'val loss', 'val bits/byte'], sources_rows)),
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        (f'Samples at step {steps}', sample_text or 'none'),
    ])
