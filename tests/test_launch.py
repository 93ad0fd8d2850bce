"""`launch/local.py` owns its processes: no orphans, no hangs, the failing code
(`python -m pytest -q tests/test_launch.py`). The workers here are plain Python processes: the
launcher does not care what they run."""

import os
import signal
import subprocess
import sys
import time

from tests.runs import ROOT

# Prints its pid; process 1 fails with code 3 after half a second when told to, the others
# sleep, and SIGTERM makes a worker exit 0 (as experiments.run does after its checkpoint).
WORKER = '''
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(os.getpid(), flush=True)
if sys.argv[1] == 'fail' and os.environ['JAX_PROCESS_ID'] == '1':
    time.sleep(0.5)
    sys.exit(3)
time.sleep(120)
'''


def start(mode: str, grace: float = 1.0) -> tuple[subprocess.Popen, list[int]]:
    launcher = subprocess.Popen(
        [sys.executable, 'launch/local.py', '--processes=2', f'--grace={grace}', '--',
         sys.executable, '-c', WORKER, mode], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    pids = [int(launcher.stdout.readline().split()[1]) for _ in range(2)]
    return launcher, pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_a_failing_worker_ends_the_others_after_the_grace_period_with_its_code():
    start_time = time.monotonic()
    launcher, pids = start('fail', grace=1.0)
    launcher.wait(timeout=30)
    assert launcher.returncode == 3
    assert time.monotonic() - start_time < 1.0 + 10
    assert 'launch/local.py: process 1 exited with 3' in launcher.stderr.read()
    assert wait_gone(pids, 5)


def test_killing_the_launcher_leaves_no_worker_running():
    launcher, pids = start('sleep')
    assert all(alive(pid) for pid in pids)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert wait_gone(pids, 10), [pid for pid in pids if alive(pid)]


def test_sigterm_to_the_launcher_reaches_every_worker():
    launcher, pids = start('sleep')
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=30)
    assert launcher.returncode == 0  # every worker stopped cleanly
    assert wait_gone(pids, 5)
