"""The accelerator benchmark's prepared script runs its whole path on tiny shapes here
(`--dry_run`), so that the one sitting on a GPU or TPU has been rehearsed; the sampling benchmark
runs on the quick pipeline's SFT model."""

import json
import subprocess
import sys

from .runs import ROOT


def test_accelerator_script_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / 'accelerator.json'
    result = subprocess.run([str(ROOT / 'benchmarks' / 'accelerator.sh'), '--dry_run',
                             '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures['dry_run'] and figures['device'] and figures['peak_flops'] > 0
    assert figures['attention'] == 'gptstack'  # on the CPU
    assert figures['peak_flops_source'].startswith(('spec sheet', 'measured'))
    for name in ('124m', '350m'):
        train = figures['train'][name]
        assert train['tokens_per_sec'] > 0 and 0 < train['mfu'] < 1 and train['loss'] > 0
    assert figures['sampler']['new_tokens_per_sec'] > 0
    ppo = figures['ppo_iteration']
    assert set(ppo['seconds']) == {'generate', 'score', 'update'}
    assert ppo['iteration_seconds'] == sum(ppo['seconds'].values()) > 0
    assert figures['memory']['peak_bytes_in_use'] is None  # XLA:CPU reports none
    assert 'reports no memory statistics' in figures['memory']['reason']


def test_sample_many_benchmark_draws_the_replies_one_call_per_batch_draws(sft_workdir, tmp_path):
    """The waves of `sample_many` against whole batches, on the quick pipeline's SFT model: the
    same replies token for token, greedy or sampled (in the `mixed` policy, which the quick
    pipeline runs on a CPU with AMX, rounding may change a rare draw that a continuation's
    prefill makes where decoding made it)."""
    out = tmp_path / 'sample_many.json'
    result = subprocess.run(
        [sys.executable, '-m', 'benchmarks.sample_many', f'--workdir={sft_workdir}',
         '--prompts=24', '--batch_size=8', '--max_new_tokens=40', '--temperatures=1.5,0',
         f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())['results']
    assert [r['temperature'] for r in results] == [1.5, 0.0]
    for r in results:
        assert r['prompts'] == 24 and r['sample_many_s'] > 0 and r['one_call_per_batch_s'] > 0
    assert results[0]['identical_replies'] >= 22 and results[1]['identical_replies'] == 24
    assert results[0]['longest_reply_tokens'] > 16  # a reply went on past the first wave
