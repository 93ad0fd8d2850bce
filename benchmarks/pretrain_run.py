"""The pretraining command against the pretraining-step benchmark, on the same shapes, one after
the other: does a user's run reach the speed `benchmarks.train_step` measures?

    python -m benchmarks.pretrain_run [--policy auto] [--steps 60] [--out pretrain_run.json]

First `python -m experiments.run --config=experiments/configs/pretrain.py:size=mini` with the
benchmark's shapes (6 layers, d_model 384, vocabulary 8192, batch 16 x 256, layers unrolled, one
device) and the runner's own process environment; its tokens/s is the median of the logged
windows after the first (which holds the compilation), read from its `metrics.jsonl`. Then
`benchmarks.train_step` with the precision the run chose, in its own process with its malloc
settings. The run includes what the step benchmark leaves out: the data pipeline, metrics and
the host loop.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks import __main__ as harness
from gptstack import environment


def pretrain(policy: str, steps: int, workdir: pathlib.Path) -> dict:
    """Runs the pretraining command on the benchmark's shapes; returns its logged speed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('GLIBC_TUNABLES', environment.MARKER, 'XLA_FLAGS')}
    command = [sys.executable, '-m', 'experiments.run',
               '--config=experiments/configs/pretrain.py:size=mini', f'--workdir={workdir}',
               '--config.tokenizer.vocab_size=8192', '--config.data.seq_len=256',
               '--config.data.batch_size=16', '--config.model.scan_layers=False',
               f'--config.precision={policy}', f'--config.train.total_steps={steps}',
               '--config.train.eval_every=0', '--config.train.sample_every=0',
               '--config.train.checkpoint_every=0', '--config.data.eval_batches=1']
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    rates = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
    chosen = next(line for line in result.stderr.splitlines() if 'precision' in line)
    return {'tokens_per_sec': statistics.median(rates[1:] or rates), 'windows': rates,
            'precision_line': chosen.split('] ', 1)[-1],
            'environment': next(line for line in result.stderr.splitlines()
                                if 'process environment' in line).split('] ', 1)[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--policy', default='auto',
                        help='the run\'s precision: auto, float32, mixed or bfloat16')
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--out', default='pretrain_run.json')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = pretrain(args.policy, args.steps, pathlib.Path(tmp) / 'run')
    policy = run['precision_line'].split('precision ')[1].split()[0]
    step = harness.run('train_step', '--policy', policy)['policies'][policy]
    result = {'policy': policy, 'train_step_tokens_per_sec': step['tokens_per_sec'],
              'run_tokens_per_sec': run['tokens_per_sec'],
              'ratio': run['tokens_per_sec'] / step['tokens_per_sec'], 'run': run}
    print(f'{policy}: experiments.run {run["tokens_per_sec"]:.0f} tokens/s, '
          f'benchmarks.train_step {step["tokens_per_sec"]:.0f} tokens/s, '
          f'ratio {result["ratio"]:.3f}\n{run["environment"]}')
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    main()
