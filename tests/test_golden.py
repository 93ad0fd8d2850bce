"""The quick pipeline's numbers against a recorded snapshot: every stage's metrics (clocks
aside), the comparison and its per-prompt scores. A change that should leave every number as it
was (a refactor, a move between modules) must pass this unchanged; a change that means to alter
the numbers re-records the snapshot and says so in its commit:

    python -m tests.test_golden --record

Floating-point results depend on the processor's instruction set, so the snapshot is compared
on the kind of processor it was recorded on and skipped elsewhere (re-record to compare there).
"""

import argparse
import json
import math
import pathlib
import platform
import sys
import tempfile

import pytest

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'quick_pipeline.json'
STAGES = ('pretrain', 'sft', 'reward', 'rl', 'rl_small_beta', 'rl_gold')
COMPARISON = 'comparison.json'
PER_PROMPT = 'comparison_prompts.jsonl'


def machine() -> str:
    """The processor and XLA version that the recorded numbers belong to."""
    import jaxlib

    model = next((line.split(':', 1)[1].strip() for line in
                  pathlib.Path('/proc/cpuinfo').read_text().splitlines()
                  if line.startswith('model name')), platform.processor()) \
        if pathlib.Path('/proc/cpuinfo').exists() else platform.processor()
    return f'{platform.machine()} {model}, jaxlib {jaxlib.__version__}'


def _plain(value):
    """JSON-comparable values: NaN (never equal to itself) as a string."""
    if isinstance(value, float) and math.isnan(value):
        return 'nan'
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def snapshot(workdir: pathlib.Path) -> dict:
    """What a numerically neutral change leaves as it was: metrics but the clocks, and the
    comparison but its wall time."""
    def clock(key):
        return ('time' in key or key.startswith(('tokens_per_sec', 'memory/'))
                or key == 'mfu')

    def jsonl(path):
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    stages = {stage: [{k: v for k, v in r.items() if not clock(k)}
                      for r in jsonl(workdir / stage / 'metrics.jsonl')] for stage in STAGES}
    comparison = json.loads((workdir / COMPARISON).read_text())
    comparison.pop('seconds')
    comparison.pop('seconds_by_model')
    comparison.pop('peak_memory_gib')
    comparison.pop('settings', None)  # the configuration, not a result
    return _plain({'stages': stages, 'comparison': comparison,
                   'per_prompt': jsonl(workdir / PER_PROMPT)})


def test_quick_pipeline_reproduces_the_recorded_numbers(pipeline_workdir):
    recorded = json.loads(GOLDEN.read_text())
    if recorded['machine'] != machine():
        pytest.skip(f'recorded on {recorded["machine"]}; this is {machine()}')
    current = snapshot(pipeline_workdir)
    for stage in STAGES:
        assert current['stages'][stage] == recorded['values']['stages'][stage], stage
    assert current['comparison'] == recorded['values']['comparison']
    assert current['per_prompt'] == recorded['values']['per_prompt']


def record(workdir: pathlib.Path | None) -> None:
    """Runs the quick pipeline as the test fixture does (or reads a finished `workdir`) and
    writes the snapshot."""
    from tests import conftest  # noqa: F401  (8 emulated devices, as in the test session)
    from tests.runs import pipeline_command, run, write_corpus

    if workdir is None:
        root = pathlib.Path(tempfile.mkdtemp(prefix='gptstack-golden-'))
        corpus = write_corpus(root / 'corpus')
        workdir = root / 'pipeline'
        result = run(pipeline_command(corpus, workdir))
        if result.returncode:
            sys.exit(result.stderr[-3000:])
    GOLDEN.write_text(json.dumps({'machine': machine(), 'values': snapshot(workdir)},
                                 indent=1) + '\n')
    print(f'recorded {GOLDEN} on {machine()}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Record the quick pipeline snapshot.')
    parser.add_argument('--record', action='store_true', required=True)
    parser.add_argument('--workdir', type=pathlib.Path, help='a finished quick pipeline run '
                        'on the test corpus (default: run one)')
    args = parser.parse_args()
    record(args.workdir)
