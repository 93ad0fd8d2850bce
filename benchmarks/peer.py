"""The PyTorch peer benchmark (../shared/bench/peer_bench.py), run from our benchmarks in the same
sitting: a Python with torch and transformers runs one of its sections, and we read its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

SCRIPT = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'bench', 'peer_bench.py')


def run(python: str, section: str, *args: str, script: str = SCRIPT,
        figure: str) -> dict[str, float]:
    """`{configuration: figure}` from the peer's `section` (`train`, `generate`), where `figure`
    is the per-configuration key to read (e.g. `tokens_per_s_median`). The peer gets the same
    thread budget as we do (`OMP_NUM_THREADS`, default 2) and its own best process environment:
    without the `GLIBC_TUNABLES` malloc settings that speed up XLA and slow PyTorch."""
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    env['OMP_NUM_THREADS'] = os.environ.get('OMP_NUM_THREADS', '2')
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'peer.json')
        subprocess.run([python, script, '--only', section, *args, '--out', out], check=True,
                       env=env)
        with open(out) as f:
            results = json.load(f)
    figures = {name: entry[figure] for name, entry in results.get(section, {}).items()
               if isinstance(entry, dict) and figure in entry}
    if not figures:
        raise RuntimeError(f'no {figure} in the peer\'s {section!r} output: {sorted(results)}')
    return figures
