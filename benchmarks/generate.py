"""Generation throughput of the KV-cache sampler on the peer benchmark's shape.

    python -m benchmarks.generate [--rounds 5] [--out generate.json]

GPT-2 layout, 6 layers, d_model 384, 6 heads, vocab 8192, context 256 (the model of
../shared/bench/peer_bench.py); batch 16, prompt 32 tokens, exactly 224 new tokens (no stop
token), temperature 1. Reports new tokens per second (median over rounds, after a compile call)
on one device using all cores. Compare with `peer_bench.py --only generate` run in the same
sitting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from gptstack import model as gpt_model
from gptstack import sharding
from gptstack.config import GPTConfig, MeshConfig
from gptstack.sampling import Sampler, SamplingParams

BATCH, PROMPT, NEW = 16, 32, 224


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    parser.add_argument('--out', default='generate.json')
    args = parser.parse_args()
    config = GPTConfig.preset('mini', dtype=args.dtype)
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(gpt_model.GPT(config, rngs=nnx.Rngs(0)), nnx.Param)
    sampler = Sampler(graphdef, config, mesh, 'fsdp', batch_size=BATCH, max_new_tokens=NEW,
                      stop_ids=[], pad_id=0)
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (BATCH, PROMPT)).tolist()
    start = time.perf_counter()
    out = sampler(params, prompts, jax.random.key(0))
    compile_seconds = time.perf_counter() - start
    assert (out['lengths'] == NEW).all()
    rates = []
    for i in range(args.rounds):
        start = time.perf_counter()
        sampler(params, prompts, jax.random.key(i + 1), SamplingParams(temperature=1.0))
        rates.append(BATCH * NEW / (time.perf_counter() - start))
    result = {'new_tokens_per_sec': statistics.median(rates), 'min': min(rates),
              'max': max(rates), 'first_call_seconds': compile_seconds, 'dtype': args.dtype,
              'shape': 'gpt2 6L d384 6H V8192 T256', 'batch': BATCH, 'prompt': PROMPT,
              'new_tokens': NEW}
    print(json.dumps(result, indent=1))
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
