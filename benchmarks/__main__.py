"""Every benchmark in one sitting, one table and one JSON file.

    python -m benchmarks [--peer_python .venv-peer/bin/python] [--out benchmarks.json]

Runs, each in its own process (the memory benchmark needs eight emulated devices, the timed
ones the whole machine as one device): the pretraining step (`benchmarks.train_step`),
generation (`benchmarks.generate`), one PPO iteration (`benchmarks.ppo_iteration`) and the
per-device state memory under FSDP=1..8 (`benchmarks.memory`). With `--peer_python`, the PyTorch
peer's training and generation sections run in between our rounds (see those modules). Set
`GLIBC_TUNABLES` (docs/performance.md) in the environment for the figures stated there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def run(module: str, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        subprocess.run([sys.executable, '-m', f'benchmarks.{module}', *args, '--out', out],
                       check=True)
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--peer_python', default='',
                        help='a Python with torch and transformers: also run the peer')
    parser.add_argument('--out', default='benchmarks.json')
    args = parser.parse_args()
    peer = ['--peer_python', args.peer_python] if args.peer_python else []
    results = {'train_step': run('train_step', *peer), 'generate': run('generate', *peer),
               'ppo_iteration': run('ppo_iteration'), 'memory': run('memory')}

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
    for policy, r in results['ppo_iteration']['policies'].items():
        parts = ', '.join(f'{part} {r[part]["seconds"]:.2f} s'
                          for part in ('generate', 'score', 'update'))
        print(f'PPO iteration,    {policy:8s} {r["iteration_seconds"]:.2f} s ({parts})')
    for row in results['memory']['fsdp']:
        print(f'FSDP={row["devices"]}: state {row["state_bytes"] / 2**20:.2f} MiB per device, '
              f'{row["fraction_of_unsharded"]:.4f} of FSDP=1 ({row["times_devices"]:.3f}/N)')
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
