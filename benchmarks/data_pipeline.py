"""Tokenizer training time and pretraining-pipeline throughput against the training step.

    python -m benchmarks.data_pipeline [--out data_pipeline.json]

On the embedded default corpus and the default pretraining config, measures: reading the corpus,
training the tokenizer, tokenizing every source (cold cache), the pipeline's packed-batch
throughput in tokens/s, and the training step's tokens/s on this machine. The pipeline must
deliver at least 10x what the step consumes, so data never stalls training. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import jax
import numpy as np

from experiments.configs import pretrain as pretrain_config
from experiments.pretrain import model_config_for
from gptstack import environment, sharding
from gptstack import model as gpt_model
from gptstack.config import MeshConfig, OptimConfig
from gptstack.data import pretrain as data
from gptstack.data import sources
from gptstack.data.tokenizer import train_tokenizer
from gptstack.optim import make_optimizer
from gptstack.state import create_train_state
from gptstack.steps.lm import make_lm_step


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data_pipeline.json')
    parser.add_argument('--batches', type=int, default=300)
    parser.add_argument('--steps', type=int, default=8)
    args = parser.parse_args()
    config = pretrain_config.get_config()
    specs = sources.specs_from_config(config.data.sources)
    seq_len, batch_size = config.data.seq_len, config.data.batch_size
    results = {'machine': platform.processor() or platform.machine(), 'devices': jax.device_count()}

    documents, results['read_seconds'] = timed(
        lambda: [d for s in specs for d in sources.read_source(s, sources.SkipBudget())])
    results['corpus_mb'] = sum(len(d.encode()) for d in documents) / 1e6
    tokenizer, results['tokenizer_train_seconds'] = timed(
        lambda: train_tokenizer(documents, config.tokenizer.vocab_size,
                                max_lines=config.tokenizer.max_lines))
    with tempfile.TemporaryDirectory() as cache:
        tokenized, results['tokenize_seconds'] = timed(
            lambda: [data.tokenize_source(s, tokenizer, cache) for s in specs])
        results['tokens'] = sum(s.meta['train_tokens'] + s.meta['val_tokens'] for s in tokenized)
        iterator = iter(data.make_train_dataset(tokenized, seq_len, batch_size, seed=0))
        next(iterator)
        _, seconds = timed(lambda: [next(iterator) for _ in range(args.batches)])
        results['pipeline_tokens_per_sec'] = args.batches * batch_size * seq_len / seconds
        batch = next(iterator)

    # The training step of the default model, on this machine (one device: all cores).
    model_config = model_config_for(
        config, tokenizer, environment.precision(config.precision, jax.default_backend())[1])
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimConfig(total_steps=100, warmup_steps=1))
    graphdef, state, shardings = create_train_state(
        lambda rngs: gpt_model.GPT(model_config, rngs=rngs), tx, mesh, 'fsdp',
        jax.random.key(0))
    step = make_lm_step(graphdef, tx, schedule, mesh, 'fsdp', shardings, batch_size)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    results['step_tokens_per_sec'] = batch_size * seq_len / float(np.median(times))
    results['ratio'] = results['pipeline_tokens_per_sec'] / results['step_tokens_per_sec']

    width = max(map(len, results))
    for key, value in results.items():
        print(f'{key:<{width}}  {value:,.3f}' if isinstance(value, float) else
              f'{key:<{width}}  {value}')
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)
    assert results['ratio'] >= 10, 'the input pipeline would stall training'


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    main()
