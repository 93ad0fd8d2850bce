"""Multi-controller runs on one machine: 2 processes x 4 CPU devices against 1 process x 8.

The processes find each other through `jax.distributed.initialize` on localhost, exactly as the
hosts of a TPU pod slice do; `launch/local.py` starts them.
"""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from launch.local import free_port, process_env
from tests.runs import (
    LONG,
    ROOT,
    command,
    losses,
    metrics,
    pipeline_command,
    run,
    start_and_wait_for_checkpoint,
)

# A constant learning rate after warmup: runs of 4 and of 6 steps take the same first 4 steps.
# Float32 on every CPU: with bfloat16 matmul inputs (`mixed`, chosen on CPUs with AMX) the
# sums that the two layouts order differently differ by more than the tolerance.
SCHEDULE = ('--config.optim.end_lr_ratio=1.0', '--config.train.sample_every=0',
            '--config.precision=float32')


def two_processes(args):
    launcher = [sys.executable, 'launch/local.py', '--processes=2', '--devices_per_process=4',
                '--', *args]
    return run(launcher)


def test_two_processes_equal_one_and_their_checkpoint_resumes_on_one(corpus, tmp_path):
    cache = f'--config.data.cache_dir={tmp_path / "cache"}'
    reference = run(command(corpus, tmp_path / 'one', '--config.train.total_steps=6', cache,
                            *SCHEDULE))
    assert reference.returncode == 0, reference.stderr[-3000:]
    split = two_processes(command(corpus, tmp_path / 'two', '--config.train.total_steps=4',
                                  cache, *SCHEDULE))
    assert split.returncode == 0, split.stdout[-3000:]
    assert '[1] ' in split.stdout  # both processes ran
    expected = losses(tmp_path / 'one')
    got = losses(tmp_path / 'two')
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)
    # The checkpoint the two processes wrote resumes on one process with 8 devices.
    resumed = run(command(corpus, tmp_path / 'two', '--config.train.total_steps=6', cache,
                          *SCHEDULE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming from' in resumed.stderr
    got = losses(tmp_path / 'two')
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)


def numbers(tree, prefix=''):
    """The numbers of a JSON tree by path."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(numbers(value, f'{prefix}{key}/'))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f'{prefix}{key}'] = value
    return out


def measured(record):
    """A metrics record without its timings."""
    return {k: v for k, v in record.items()
            if not k.startswith(('time/', 'tokens_per_sec', 'wall_time', 'step_time', 'mfu',
                                     'memory/'))}


def test_reward_dpo_rl_and_comparison_on_two_processes_equal_one(corpus, pipeline_workdir,
                                                                 tmp_path):
    """The reward stage (its sampled comparisons, training and best-of-N), DPO (its reference
    cache, training and evaluation), PPO and the comparison of the quick pipeline on 2
    processes x 4 devices, from the same SFT model as the fixture's run on 1 process x 8 (its
    other RL runs, the same code as PPO's, are copied)."""
    workdir = tmp_path / 'two'
    workdir.mkdir()
    copied = ('tokenizer', 'pretrain', 'sft', 'rl_small_beta', 'rl_gold', 'grpo')
    for stage in copied:
        shutil.copytree(pipeline_workdir / stage, workdir / stage)
    ledger = json.loads((pipeline_workdir / 'pipeline.json').read_text())
    (workdir / 'pipeline.json').write_text(json.dumps({k: ledger[k] for k in copied}))
    split = two_processes(pipeline_command(corpus, workdir))
    assert split.returncode == 0, split.stdout[-3000:]
    assert '[1] ' in split.stdout and 'stage reward finished earlier' not in split.stdout

    # The comparison samples every model the same way: its scores are equal, not close.
    one = numbers(json.loads((pipeline_workdir / 'comparison.json').read_text()))
    two = numbers(json.loads((workdir / 'comparison.json').read_text()))
    for timings in (one, two):
        for key in [k for k in timings if k.startswith(('seconds', 'peak_memory'))]:
            timings.pop(key)
    # The KL to SFT sums log-probabilities of forward passes laid out over other devices:
    # equal to rounding.
    kl = [k for k in one if k.split('/')[-1] in ('kl', 'kl_stderr')]
    np.testing.assert_allclose([two.pop(k) for k in kl], [one.pop(k) for k in kl], atol=1e-4)
    assert two == one
    def prompt_scores(path):
        return [{k: v for k, v in json.loads(line).items() if k != 'kl'}
                for line in path.read_text().splitlines()]

    assert prompt_scores(workdir / 'comparison_prompts.jsonl') == \
        prompt_scores(pipeline_workdir / 'comparison_prompts.jsonl')
    # Training sums gradients across processes in another order: equal to rounding. A clip
    # fraction counts values at a threshold, which rounding moves across it for a few rows.
    for stage in ('reward', 'dpo', 'rl'):
        expected, got = metrics(pipeline_workdir / stage), metrics(workdir / stage)
        assert [r['step'] for r in got] == [r['step'] for r in expected], stage
        for want, have in zip(expected, got, strict=True):
            want, have = measured(want), measured(have)
            assert set(have) == set(want), stage
            for key in want:
                tolerance = dict(atol=0.05) if key.endswith('clipfrac') else dict(rtol=1e-3,
                                                                                  atol=1e-4)
                np.testing.assert_allclose(have[key], want[key], **tolerance,
                                           err_msg=f'{stage} step {want["step"]} {key}')
    assert (workdir / 'reward' / 'comparisons' / 'train.jsonl').read_text() == \
        (pipeline_workdir / 'reward' / 'comparisons' / 'train.jsonl').read_text()


@pytest.mark.alone
def test_a_killed_process_stops_the_others_at_once_with_one_line(corpus, tmp_path):
    """Process 1 killed after step 5: the survivor notices at its next collective (its link is
    closed) or by the watchdog, whichever comes first, and exits 1 with one line, long before
    the runtime's heartbeat timeout would abort it. (When process 0, which hosts the runtime's
    coordination service, dies, every other process's runtime client aborts at once; see
    docs/reliability.md.)"""
    port = free_port()
    args = [*command(corpus, tmp_path, *LONG), '--heartbeat_timeout=20']
    survivor = subprocess.Popen(args, cwd=ROOT, env=process_env(0, 2, 4, port),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = start_and_wait_for_checkpoint(args, tmp_path, 5, env=process_env(1, 2, 4, port))
    killed.kill()
    killed.communicate()
    start = time.monotonic()
    _, stderr = survivor.communicate(timeout=120)
    assert survivor.returncode == 1, stderr[-3000:]
    assert time.monotonic() - start < 15  # 0.6 x 20 s of silence at most
    reasons = ('process 0: a collective with the other processes failed, so one of them has '
               'probably stopped (see its log); exiting 1.',
               'process 0: process 1 has given no sign of life for 12 s (it died or hangs; see '
               'its log); exiting 1')
    assert sum(reason in stderr for reason in reasons) == 1, stderr[-3000:]
    assert 'Traceback' not in stderr and 'Fatal' not in stderr and 'Check failure' not in stderr
