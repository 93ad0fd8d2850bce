"""Generation throughput of the KV-cache sampler on the peer benchmark's shape.

    python -m benchmarks.generate [--policy float32,mixed] [--rounds 7] [--out generate.json]
    python -m benchmarks.generate --peer_python .venv-peer/bin/python   # with the PyTorch peer

GPT-2 layout, 6 layers, d_model 384, 6 heads, vocab 8192, context 256 (the model of
../shared/bench/peer_bench.py); batch 16, prompt 32 tokens, exactly 224 new tokens (no stop
token), temperature 1. Reports new tokens per second (median over rounds, after a compile call)
on one device using all cores, for each precision policy:

    float32   float32 everything
    mixed     float32 activations, bfloat16 matmul inputs (float32 accumulation) and KV cache
    bfloat16  bfloat16 activations, KV cache and matmul inputs

With `--peer_python` (a Python with torch and transformers), the peer's generation section runs
in between two passes of ours, in the same sitting, and the ratios to HF `generate` are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import peer as peer_bench
from gptstack import environment, sharding
from gptstack import model as gpt_model
from gptstack.config import GPTConfig, MeshConfig
from gptstack.environment import PRECISIONS
from gptstack.sampling import Sampler, SamplingParams

BATCH, PROMPT, NEW = 16, 32, 224
# The precision policies, as the runner names them (`--config.precision`).
POLICIES = PRECISIONS


def parse_policies(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """`--policy a,b` as a list, each checked against `POLICIES`."""
    policies = text.split(',')
    for policy in policies:
        if policy not in POLICIES:
            parser.error(f'--policy {policy!r}: expected one of {sorted(POLICIES)}')
    return policies


def build(policy: str):
    config = GPTConfig.preset('mini', **POLICIES[policy])
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(gpt_model.GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
    sampler = Sampler(graphdef, config, mesh, 'fsdp', batch_size=BATCH, max_new_tokens=NEW,
                      stop_ids=[], pad_id=0)
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (BATCH, PROMPT)).tolist()
    start = time.perf_counter()
    out = sampler(params, prompts, jax.random.key(0))
    assert (out['lengths'] == NEW).all()
    return sampler, params, prompts, time.perf_counter() - start


def measure(runs, rounds: int, rates: dict[str, list[float]]):
    """Times the policies round-robin, so that a slow spell of the machine hits them alike."""
    for i in range(rounds):
        for policy, (sampler, params, prompts, _) in runs.items():
            start = time.perf_counter()
            sampler(params, prompts, jax.random.key(i + 1), SamplingParams(temperature=1.0))
            rates[policy].append(BATCH * NEW / (time.perf_counter() - start))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--policy', default='float32,mixed',
                        help=f'comma-separated, of {sorted(POLICIES)}')
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--peer_python', default='',
                        help='a Python with torch and transformers: also run the peer')
    parser.add_argument('--peer_script', default=peer_bench.SCRIPT)
    parser.add_argument('--out', default='generate.json')
    args = parser.parse_args()
    policies = parse_policies(parser, args.policy)
    runs = {policy: build(policy) for policy in policies}
    rates = {policy: [] for policy in policies}
    measure(runs, args.rounds, rates)
    peer = {}
    if args.peer_python:
        peer = peer_bench.run(args.peer_python, 'generate', script=args.peer_script,
                              figure='new_tokens_per_s_median')
        measure(runs, args.rounds, rates)
    result = {'shape': 'gpt2 6L d384 6H V8192 T256', 'batch': BATCH, 'prompt': PROMPT,
              'new_tokens': NEW, 'cpu_count': os.cpu_count(), 'policies': {}}
    for policy in policies:
        r = rates[policy]
        result['policies'][policy] = {
            'new_tokens_per_sec': statistics.median(r), 'min': min(r), 'max': max(r),
            'rounds': len(r), 'first_call_seconds': runs[policy][3]}
    if peer:
        result['peer_new_tokens_per_sec'] = peer
        hf = {name: value for name, value in peer.items() if name.startswith('hf')}
        best = max(statistics.median(rates[p]) for p in policies)
        result['ratio_to_hf_generate'] = {name: best / value for name, value in hf.items()}
        result['ratio_to_fastest_peer'] = best / max(peer.values())
    print(json.dumps(result, indent=1))
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    sys.exit(main() and 0)
