"""The accelerator benchmark's prepared script runs its whole path on tiny shapes here
(`--dry_run`), so that the one sitting on a GPU or TPU has been rehearsed."""

import json
import subprocess

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
