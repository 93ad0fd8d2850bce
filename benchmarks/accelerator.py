"""One prepared benchmark for one accelerator: everything in one process, one JSON.

    benchmarks/accelerator.sh [--dry_run] [--out benchmarks/results/<device>.json]

On the first device, in the platform's default precision (`precision=auto`: bfloat16 on GPUs
and TPUs) and with the same model, step, sampler and PPO iteration as the stages:

- training tokens/s and MFU of a 124M-class and a 350M-class GPT (the `gpt2-124m` and
  `gpt2-350m` presets, T = 1,024, AdamW, the pretraining step), MFU against the chip's
  datasheet bf16 peak (`gptstack.metrics.PEAK_FLOPS`, named in the JSON);
- the sampler's new tokens/s at batch 64;
- one PPO iteration of the 124M model (64 rollouts, critic, reference and reward model of the
  same size), split into generation, scoring and update;
- the peak device memory over all of it.

About five minutes on one H100-class GPU, compilations included. `--dry_run` runs the same code
on tiny shapes on whatever device there is (the CPU in CI); its MFU is then against a measured
matmul and its figures mean nothing beyond "the path runs".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from benchmarks import ppo_iteration as ppo_benchmark
from gptstack import environment, sharding
from gptstack.config import GPTConfig, MeshConfig, OptimConfig
from gptstack.metrics import peak_flops_per_device, train_flops_per_token
from gptstack.model import GPT
from gptstack.optim import make_optimizer
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import (
    abstract_model,
    create_train_state,
    init_params,
)
from gptstack.steps.lm import make_lm_step


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one sitting: training models and batch, sampler and PPO rollouts."""

    train: dict[str, tuple[str, int]]  # name -> (preset, batch rows)
    seq_len: int
    steps: int
    sample_batch: int
    prompt: int
    new_tokens: int
    ppo_preset: str


FULL = Sizes(train={'124m': ('gpt2-124m', 16), '350m': ('gpt2-350m', 8)}, seq_len=1024,
             steps=20, sample_batch=64, prompt=128, new_tokens=256, ppo_preset='gpt2-124m')
DRY = Sizes(train={'124m': ('toy', 4), '350m': ('toy-llama', 4)}, seq_len=64, steps=3,
            sample_batch=64, prompt=8, new_tokens=8, ppo_preset='toy')


def platform_policy() -> tuple[str, dict, str]:
    """`(precision, GPTConfig fields, why that attention)`: what a run on this platform
    computes with (`gptstack.stage.setup` chooses the same)."""
    platform = jax.default_backend()
    precision, policy = environment.precision('auto', platform)
    policy['attention'], why = environment.attention(platform, policy['matmul_dtype'])
    return precision, policy, why


def model_config(preset: str, seq_len: int) -> GPTConfig:
    """The preset at `seq_len`, computing in this platform's default precision and attention."""
    return GPTConfig.preset(preset, max_seq_len=seq_len, **platform_policy()[1])


def one_device_mesh():
    return sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])


def lm_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int) -> dict:
    tokens = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
            'loss_mask': np.ones((rows, seq_len), np.float32),
            'segment_ids': np.ones((rows, seq_len), np.int32),
            'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                         (rows, seq_len)).copy()}


def training(preset: str, rows: int, sizes: Sizes, peak: float) -> dict:
    """Median tokens/s and MFU of the pretraining step over `sizes.steps` (after one that
    compiles)."""
    config = model_config(preset, sizes.seq_len)
    mesh = one_device_mesh()
    tx, schedule = make_optimizer(OptimConfig(lr=3e-4, total_steps=10_000, warmup_steps=10))
    graphdef, state, shardings = create_train_state(lambda rngs: GPT(config, rngs=rngs), tx,
                                                    mesh, 'fsdp', jax.random.key(0))
    step = make_lm_step(graphdef, tx, schedule, mesh, 'fsdp', shardings, rows)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    state, metrics = step(state, lm_batch(rng, rows, sizes.seq_len, config.vocab_size))
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(sizes.steps):
        batch = lm_batch(rng, rows, sizes.seq_len, config.vocab_size)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    tokens_per_sec = rows * sizes.seq_len / statistics.median(times)
    flops = train_flops_per_token(config, sizes.seq_len)
    return {'preset': preset, 'batch': [rows, sizes.seq_len], 'tokens_per_sec': tokens_per_sec,
            'model_flops_per_token': flops, 'mfu': tokens_per_sec * flops / peak,
            'first_step_seconds': compile_seconds, 'loss': float(metrics['loss'])}


def sampling(sizes: Sizes) -> dict:
    """New tokens/s of the KV-cache sampler at `sizes.sample_batch` rows, no stop token."""
    config = model_config(sizes.ppo_preset, sizes.seq_len)
    graphdef = abstract_model(lambda rngs: GPT(config, rngs=rngs))[0]
    params = jax.jit(lambda key: init_params(lambda rngs: GPT(config, rngs=rngs), key))(
        jax.random.key(0))
    sampler = Sampler(graphdef, config, one_device_mesh(), 'fsdp',
                      batch_size=sizes.sample_batch, max_new_tokens=sizes.new_tokens,
                      stop_ids=[], pad_id=0)
    prompts = np.random.default_rng(0).integers(
        0, config.vocab_size, (sizes.sample_batch, sizes.prompt)).tolist()
    sampler(params, prompts, jax.random.key(0))  # compiles
    rates = []
    for i in range(3):
        start = time.perf_counter()
        out = sampler(params, prompts, jax.random.key(i + 1), SamplingParams(temperature=1.0))
        rates.append(int(out['lengths'].sum()) / (time.perf_counter() - start))
    return {'preset': sizes.ppo_preset, 'batch': sizes.sample_batch, 'prompt': sizes.prompt,
            'new_tokens': sizes.new_tokens, 'new_tokens_per_sec': statistics.median(rates)}


def ppo_iteration(sizes: Sizes) -> dict:
    """Seconds of one PPO iteration (after one that compiles): 64 rollouts, one per prompt,
    two epochs of two minibatches; all four roles of the same size from random weights
    (`benchmarks.ppo_iteration.build`)."""
    config = model_config(sizes.ppo_preset, sizes.seq_len)
    rollouts = 64
    iteration, state = ppo_benchmark.build(config, rollouts, sizes.new_tokens)
    prompts = {'tokens': np.random.default_rng(0).integers(
                   1, config.vocab_size - 1, (rollouts, sizes.prompt)).astype(np.int32),
               'lengths': np.full(rollouts, sizes.prompt, np.int32)}
    for i in range(2):  # the first compiles
        state, metrics = iteration(state, prompts, jax.random.key(i))
    seconds = {part: float(metrics[f'time/{part}']) for part in ppo_benchmark.PARTS}
    return {'preset': sizes.ppo_preset, 'rollouts': rollouts, 'prompt': sizes.prompt,
            'new_tokens': sizes.new_tokens, 'seconds': seconds,
            'iteration_seconds': sum(seconds.values())}


def peak_memory() -> dict:
    """The device's peak bytes in use so far, where its runtime reports them (GPUs and TPUs;
    XLA:CPU does not)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use')
    return {'peak_bytes_in_use': peak, 'bytes_limit': stats.get('bytes_limit')} if peak else \
        {'peak_bytes_in_use': None, 'reason': f'{jax.devices()[0].platform} reports no memory '
                                              'statistics'}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry_run', action='store_true',
                        help='tiny shapes on any device: the same code path, in seconds')
    parser.add_argument('--out', default='')
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    device = jax.devices()[0]
    precision, policy, why = platform_policy()
    peak, peak_source = peak_flops_per_device(policy['matmul_dtype'])
    start = time.perf_counter()
    result = {'device': device.device_kind, 'platform': device.platform,
              'device_count': jax.device_count(), 'jax': jax.__version__,
              'dry_run': args.dry_run, 'precision': precision,
              'attention': policy['attention'], 'attention_why': why, 'peak_flops': peak,
              'peak_flops_source': peak_source,
              'train': {name: training(preset, rows, sizes, peak)
                        for name, (preset, rows) in sizes.train.items()},
              'sampler': sampling(sizes), 'ppo_iteration': ppo_iteration(sizes),
              'memory': peak_memory()}
    result['seconds'] = time.perf_counter() - start
    for name, r in result['train'].items():
        print(f'train {name}: {r["tokens_per_sec"]:,.0f} tokens/s, MFU {r["mfu"]:.1%}')
    print(f'sampler: {result["sampler"]["new_tokens_per_sec"]:,.0f} new tokens/s at batch '
          f'{sizes.sample_batch}; PPO iteration '
          f'{result["ppo_iteration"]["iteration_seconds"]:.2f} s')
    out = pathlib.Path(args.out or f'accelerator_{device.device_kind.replace(" ", "_")}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + '\n')
    print(f'wrote {out} ({result["seconds"]:.0f} s)')
    return result


if __name__ == '__main__':
    environment.cpu_without_accelerators()
    main()
