"""Helpers for tests that run whole stages as `python -m experiments.run` subprocesses, or a
server (`experiments.serve`); the shared workdirs they start from are session fixtures in
`conftest.py`."""

import contextlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The quick pipeline's console output (stdout and stderr), kept in its workdir by the
# `pipeline_workdir` fixture.
CONSOLE = 'console.txt'

# Many steps with frequent checkpoints and nothing else: for kill-and-resume tests.
LONG_STEPS = 120
LONG = (f'--config.train.total_steps={LONG_STEPS}', '--config.train.checkpoint_every=5',
        '--config.train.eval_every=0', '--config.train.sample_every=0')
# The longest reply the test servers give (of the SFT model's 96-token context).
SERVE_MAX_NEW = 24
# Room for task conversations in runlocal models.
SFT = ('--config.data.seq_len=96',)
# Enough held-out prompts that some of a tiny model's replies differ in gold score.
REWARD = ('--config.data.validation_prompts=48',)


def write_corpus(root: pathlib.Path) -> pathlib.Path:
    """A few standard-library files as code, a JSONL of docstrings as prose and one of a few
    pages of worked examples, under `root`: the default mixture's three sources, small."""
    import itertools

    from gptstack.data import sources, tasks

    (root / 'code').mkdir(parents=True)
    for i, doc in enumerate(itertools.islice(sources.python_code_documents(), 25)):
        (root / 'code' / f'{i:02d}.txt').write_text(doc)
    with open(root / 'prose.jsonl', 'w') as f:
        for doc in itertools.islice(sources.python_prose_documents(), 60):
            f.write(json.dumps({'text': doc}) + '\n')
    with open(root / 'worked.jsonl', 'w') as f:
        for doc in tasks.worked_documents(documents=40, per_document=8):
            f.write(json.dumps({'text': doc}) + '\n')
    return root


def corpus_overrides(corpus, prefix='data.sources') -> list[str]:
    """Flags pointing a config's mixture (`<prefix>.<source>.paths`) at the test corpus."""
    paths = {'code': corpus / 'code', 'prose': corpus / 'prose.jsonl',
             'worked': corpus / 'worked.jsonl'}
    return [f'--config.{prefix}.{name}.paths={path}' for name, path in paths.items()]


def command(corpus, workdir, *overrides, config='pretrain.py:runlocal'):
    return [sys.executable, '-m', 'experiments.run',
            f'--config=experiments/configs/{config}', f'--workdir={workdir}',
            *corpus_overrides(corpus), *overrides]


def sft_command(workdir, init_from, *overrides):
    return [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/sft.py:runlocal',
            f'--workdir={workdir}', f'--config.init_from={init_from}', *SFT, *overrides]


def reward_command(workdir, init_from, *overrides, config='reward.py:runlocal'):
    return [sys.executable, '-m', 'experiments.run', f'--config=experiments/configs/{config}',
            f'--workdir={workdir}', f'--config.init_from={init_from}', *REWARD, *overrides]


def rl_command(workdir, init_from, reward_from, *overrides):
    return [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/rl.py:runlocal',
            f'--workdir={workdir}', f'--config.init_from={init_from}',
            f'--config.reward_from={reward_from}', *overrides]


def pipeline_command(corpus, workdir, *overrides):
    """The quick pipeline on the test corpus: its stages are the same runs as `command`,
    `sft_command` and `reward_command` make."""
    return [sys.executable, '-m', 'experiments.run',
            '--config=experiments/configs/pipeline.py:quick', f'--workdir={workdir}',
            *corpus_overrides(corpus, 'pretrain.data.sources'), *overrides]


def run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def metrics(workdir):
    lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def losses(workdir):
    return {r['step']: (r['loss'], r['grad_norm']) for r in metrics(workdir) if 'loss' in r}


def start_and_wait_for_checkpoint(args, workdir, step, **kwargs):
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    deadline = time.time() + 300
    while not (pathlib.Path(workdir) / 'checkpoints' / str(step)).is_dir():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    return process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(workdir, *flags):
    """A server on `workdir` (`python -m experiments.serve`) on a free local port, once it says
    it is ready: yields `(base_url, output_lines)`. On exit it gets SIGTERM and must end with
    status 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, '-m', 'experiments.serve', f'--workdir={workdir}', f'--port={port}',
         *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    try:
        deadline = time.time() + 300
        while not any(line.startswith('ready:') for line in lines):
            assert process.poll() is None, ''.join(lines)[-3000:]
            assert time.time() < deadline, ''.join(lines)[-3000:]
            time.sleep(0.1)
        yield f'http://127.0.0.1:{port}', lines
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    assert status == 0, ''.join(lines)[-3000:]
