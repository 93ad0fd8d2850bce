"""Every benchmark in one sitting, one table and one JSON file.

    python -m benchmarks [--peer_python .venv-peer/bin/python] [--out benchmarks.json]

Runs, each in its own process (the memory benchmark needs eight emulated devices, the timed
ones the whole machine as one device): the pretraining step (`benchmarks.train_step`),
generation (`benchmarks.generate`), one PPO, GRPO and RLOO iteration
(`benchmarks.ppo_iteration`) and the per-device state memory under FSDP=1..8
(`benchmarks.memory`). With `--peer_python`, the PyTorch
peer's training and generation sections run in between our rounds (see those modules).

Each of our processes starts with the glibc malloc settings that measured fastest for it
(`MALLOC`, docs/performance.md "The process environment"); `--inherit_malloc` keeps the caller's
`GLIBC_TUNABLES` instead. The peer always runs without them (they slow PyTorch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from gptstack.environment import KEEP_MAPPED, ONE_ARENA

# The settings each benchmark measured fastest with (`gptstack.environment`): a single arena
# for training steps and PPO iterations; the batch-16 decoding loop keeps glibc's arenas.
MALLOC = {'train_step': ONE_ARENA, 'generate': KEEP_MAPPED, 'ppo_iteration': ONE_ARENA,
          'memory': KEEP_MAPPED}


def run(module: str, *args: str, inherit_malloc: bool = False) -> dict:
    """Runs `benchmarks.<module>` in its own process and returns its JSON result, with the
    process environment it ran in."""
    env = dict(os.environ)
    if not inherit_malloc:
        env['GLIBC_TUNABLES'] = MALLOC[module]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        subprocess.run([sys.executable, '-m', f'benchmarks.{module}', *args, '--out', out],
                       check=True, env=env)
        with open(out) as f:
            result = json.load(f)
    result['GLIBC_TUNABLES'] = env.get('GLIBC_TUNABLES', '')
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--peer_python', default='',
                        help='a Python with torch and transformers: also run the peer')
    parser.add_argument('--out', default='benchmarks.json')
    parser.add_argument('--inherit_malloc', action='store_true',
                        help="keep the caller's GLIBC_TUNABLES instead of `MALLOC`")
    args = parser.parse_args()
    peer = ['--peer_python', args.peer_python] if args.peer_python else []
    own = dict(inherit_malloc=args.inherit_malloc)
    results = {'train_step': run('train_step', *peer, **own),
               'generate': run('generate', *peer, **own),
               'ppo_iteration': run('ppo_iteration', **own), 'memory': run('memory', **own)}

    print('\n== summary')
    train = results['train_step']
    for policy, r in train['policies'].items():
        print(f'pretraining step, {policy:8s} {r["tokens_per_sec"]:8.0f} tokens/s  '
              f'MFU {r["mfu"]:.1%}  first step {r["first_step_seconds"]:.1f} s')
    print(f'pretraining step, compilations after the first step: '
          f'{train["compilations_after_first_step"]}')
    for name, ratio in train.get('ratio_to_peer', {}).items():
        print(f'pretraining step, ours / peer {name}: {ratio:.2f}x')
    generate = results['generate']
    for policy, r in generate['policies'].items():
        print(f'generation,       {policy:8s} {r["new_tokens_per_sec"]:8.0f} new tokens/s')
    for name, ratio in generate.get('ratio_to_hf_generate', {}).items():
        print(f'generation, ours / peer {name}: {ratio:.2f}x')
    if 'ratio_to_fastest_peer' in generate:
        print(f'generation, ours / fastest peer: {generate["ratio_to_fastest_peer"]:.2f}x')
    for algorithm, by_policy in results['ppo_iteration']['algorithms'].items():
        for policy, r in by_policy.items():
            parts = ', '.join(f'{part} {r[part]["seconds"]:.2f} s'
                              for part in ('generate', 'score', 'update'))
            print(f'{algorithm.upper() + " iteration,":17s} {policy:8s} '
                  f'{r["iteration_seconds"]:.2f} s ({parts})')
    for row in results['memory']['fsdp']:
        print(f'FSDP={row["devices"]}: state {row["state_bytes"] / 2**20:.2f} MiB per device, '
              f'{row["fraction_of_unsharded"]:.4f} of FSDP=1 ({row["times_devices"]:.3f}/N)')
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
