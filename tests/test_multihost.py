"""Multi-controller runs on one machine: 2 processes x 4 CPU devices against 1 process x 8.

The processes find each other through `jax.distributed.initialize` on localhost, exactly as the
hosts of a TPU pod slice do; `launch/local.py` starts them.
"""

import subprocess
import sys
import time

import numpy as np

from launch.local import free_port, process_env
from tests.runs import LONG, ROOT, command, losses, run, start_and_wait_for_checkpoint

# A constant learning rate after warmup: runs of 4 and of 6 steps take the same first 4 steps.
SCHEDULE = ('--config.optim.end_lr_ratio=1.0', '--config.train.sample_every=0')


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


def test_a_killed_process_stops_the_others_with_an_error(corpus, tmp_path):
    port = free_port()
    args = [*command(corpus, tmp_path, *LONG), '--heartbeat_timeout=5']
    survivor = subprocess.Popen(args, cwd=ROOT, env=process_env(0, 2, 4, port),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = start_and_wait_for_checkpoint(args, tmp_path, 5, env=process_env(1, 2, 4, port))
    victim.kill()
    victim.communicate()
    start = time.monotonic()
    _, stderr = survivor.communicate(timeout=120)
    assert survivor.returncode != 0
    assert time.monotonic() - start < 60
    assert 'another task died' in stderr
