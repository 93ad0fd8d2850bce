"""Pretraining-step throughput on the peer benchmark's workload, per precision policy.

    python -m benchmarks.train_step [--policy float32,mixed] [--rounds 10] [--out train_step.json]

GPT-2 layout, 6 layers, d_model 384, 6 heads, vocab 8192, T=256, batch 16 (the workload of
../shared/bench/peer_bench.py), layers unrolled (`scan_layers=False`), AdamW inside the jitted,
donated step. Reports per policy:
tokens/s (median over steps, timed round-robin across policies), achieved model FLOP/s with
6N + 12·L·d·T FLOPs per token (N: parameters in matmuls, i.e. without position embeddings; the
peer's formula), MFU against a matmul peak measured in the same run (4096³, float32 and bf16
inputs with float32 accumulation), the first step's compile time, the loss after the timed steps
(every policy sees the same batches), and the compilations after the first step (must be 0).

With `--peer_python` (a Python with torch and transformers), the peer's training section runs
in between two halves of our rounds, in the same sitting, and the ratios of our best policy to
each PyTorch configuration are reported (`--peer_args` picks the peer's configurations; by
default HF `GPT2LMHeadModel` and the minimal model with bf16 autocast, eager and compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from benchmarks import peer as peer_bench
from benchmarks.generate import POLICIES, parse_policies
from gptstack import environment, sharding
from gptstack import model as gpt_model
from gptstack.config import GPTConfig, MeshConfig, OptimConfig
from gptstack.metrics import measure_matmul_flops
from gptstack.optim import make_optimizer
from gptstack.state import abstract_model, create_train_state
from gptstack.steps.lm import make_lm_step

BATCH, SEQ = 16, 256


def flops_per_token(config: GPTConfig) -> float:
    """6N + 12·L·d·T with N the parameters that take part in matmuls."""
    n = gpt_model.count_params(abstract_model(lambda rngs: gpt_model.GPT(config, rngs=rngs))[1])
    n -= config.max_seq_len * config.d_model if config.family == 'gpt' else 0
    return 6 * n + 12 * config.n_layer * config.d_model * SEQ


class Compiles:
    """Counts XLA compilations (after `start()`)."""

    def __init__(self):
        self.count, self.on = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event, duration, **kwargs):
        if self.on and event == '/jax/core/compile/backend_compile_duration':
            self.count += 1

    def start(self):
        self.count, self.on = 0, True


def build(policy: str, batches):
    config = GPTConfig.preset('mini', **{'max_seq_len': SEQ, 'scan_layers': False,
                                         **POLICIES[policy]})
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimConfig(lr=3e-4, total_steps=10_000, warmup_steps=10))
    graphdef, state, shardings = create_train_state(
        lambda rngs: gpt_model.GPT(config, rngs=rngs), tx, mesh, 'fsdp', jax.random.key(0))
    step = make_lm_step(graphdef, tx, schedule, mesh, 'fsdp', shardings, BATCH)
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    return dict(config=config, step=step, state=state, compile_seconds=time.perf_counter() - start,
                times=[], loss=float(metrics['loss']))


def measure(runs: dict, batches: list):
    """One step of every policy per batch, round-robin, so that a slow spell of the machine
    hits them alike."""
    for batch in batches:
        for run in runs.values():
            start = time.perf_counter()
            run['state'], metrics = run['step'](run['state'], batch)
            jax.block_until_ready(metrics)
            run['times'].append(time.perf_counter() - start)
            run['loss'] = float(metrics['loss'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--policy', default='float32,mixed')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--out', default='train_step.json')
    parser.add_argument('--peer_python', default='',
                        help='a Python with torch and transformers: also run the peer')
    parser.add_argument('--peer_script', default=peer_bench.SCRIPT)
    parser.add_argument('--peer_args', default='--models hf,mini --precisions bf16 '
                        '--compile bf16 --rounds 5')
    args = parser.parse_args()
    policies = parse_policies(parser, args.policy)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.rounds + 1):
        tokens = rng.integers(0, 8192, (BATCH, SEQ + 1)).astype(np.int32)
        batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                        'loss_mask': np.ones((BATCH, SEQ), np.float32),
                        'segment_ids': np.ones((BATCH, SEQ), np.int32),
                        'positions': np.broadcast_to(np.arange(SEQ, dtype=np.int32),
                                                     (BATCH, SEQ)).copy()})
    compiles = Compiles()
    runs = {policy: build(policy, batches) for policy in policies}
    compiles.start()
    half = len(batches) // 2 + 1
    measure(runs, batches[1:half])
    peer = {}
    if args.peer_python:
        peer = peer_bench.run(args.peer_python, 'train', *args.peer_args.split(),
                              script=args.peer_script, figure='tokens_per_s_median')
    measure(runs, batches[half:])
    compiles.on = False
    peaks = {'float32': measure_matmul_flops('float32', n=4096),
             'bfloat16': measure_matmul_flops('bfloat16', n=4096)}
    result = {'workload': f'gpt2 6L d384 6H V8192, batch {BATCH}x{SEQ}, AdamW',
              'cpu_count': os.cpu_count(), 'matmul_peak_flops': peaks,
              'compilations_after_first_step': compiles.count, 'policies': {}}
    for policy, run in runs.items():
        seconds = statistics.median(run['times'])
        per_token = flops_per_token(run['config'])
        achieved = per_token * BATCH * SEQ / seconds
        peak = peaks[run['config'].matmul_dtype]
        result['policies'][policy] = {
            'tokens_per_sec': BATCH * SEQ / seconds,
            'tokens_per_sec_min': BATCH * SEQ / max(run['times']),
            'tokens_per_sec_max': BATCH * SEQ / min(run['times']),
            'model_flops_per_token': per_token, 'achieved_flops': achieved,
            'mfu': achieved / peak, 'peak': f'{run["config"].matmul_dtype} 4096^3 matmul',
            'first_step_seconds': run['compile_seconds'], 'final_loss': run['loss']}
    if peer:
        best = max(r['tokens_per_sec'] for r in result['policies'].values())
        result['peer_tokens_per_sec'] = peer
        result['ratio_to_peer'] = {name: best / value for name, value in peer.items()}
        result['ratio_to_fastest_peer'] = best / max(peer.values())
    print(f'{"policy":10s} {"tokens/s":>9s} {"GFLOP/s":>8s} {"MFU":>6s} {"compile":>8s} '
          f'{"loss":>7s}')
    for policy, r in result['policies'].items():
        print(f'{policy:10s} {r["tokens_per_sec"]:9.0f} {r["achieved_flops"] / 1e9:8.1f} '
              f'{r["mfu"]:6.1%} {r["first_step_seconds"]:7.1f}s {r["final_loss"]:7.4f}')
    print(f'compilations after the first step: {compiles.count}')
    for name, value in peer.items():
        print(f'peer {name:24s} {value:7.0f} tokens/s; ours {result["ratio_to_peer"][name]:.2f}x')
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    main()
