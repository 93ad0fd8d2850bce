"""Runs one command as N processes of a multi-controller JAX job on this machine.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        python -m experiments.run --config=experiments/configs/pretrain.py:runlocal \
        --workdir=workdirs/two_processes

Each process sees `--devices_per_process` CPU devices and finds the others through a
coordinator on localhost (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
which `experiments.run` reads), so the job's global mesh spans every process's devices exactly as
it would span the hosts of a TPU pod slice. Output lines carry the process index.

The launcher owns its processes:
- each runs in its own session (process group), and SIGTERM or SIGINT sent to the launcher is
  passed to every group (`experiments.run` then checkpoints and exits);
- on Linux each is told to receive SIGTERM when the launcher dies, so even `kill -9` of the
  launcher leaves nothing running;
- when one process fails, the others get `--grace` seconds to exit, then SIGTERM, then after
  `--grace` more SIGKILL;
- the launcher exits with the code of the first process to fail (128 + N for a process ended by
  signal N), or 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # prctl(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def process_env(index: int, processes: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env.update(XLA_FLAGS=' '.join([*flags, f'--xla_force_host_platform_device_count={devices}']),
               JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index),
               PYTHONUNBUFFERED='1')
    return env


def pump(index: int, stream, out) -> None:
    for line in stream:
        out.write(f'[{index}] {line}')
        out.flush()


def die_with_parent() -> None:
    """In the child before it runs the command: SIGTERM when the launcher dies (Linux)."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_code(returncode: int) -> int:
    """A process's exit code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def signal_all(children: list[subprocess.Popen], sig: int) -> None:
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.killpg(child.pid, sig)


def launch(command: list[str], processes: int, devices: int, grace: float) -> int:
    port = free_port()
    children = [subprocess.Popen(command, env=process_env(i, processes, devices, port),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, preexec_fn=die_with_parent)
                for i in range(processes)]
    pumps = [threading.Thread(target=pump, args=(i, c.stdout, sys.stdout), daemon=True)
             for i, c in enumerate(children)]
    for thread in pumps:
        thread.start()

    def forward(signum, frame):  # every process checkpoints and stops, then so do we
        signal_all(children, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first_failure: tuple[int, int] | None = None  # (index, code) of the first to fail
    failed_at, escalated = None, []
    try:
        while any([c.poll() is None for c in children]):  # a list: poll every process
            for index, child in enumerate(children):
                if child.returncode not in (None, 0) and first_failure is None:
                    first_failure, failed_at = (index, child.returncode), time.monotonic()
            waited = 0.0 if failed_at is None else time.monotonic() - failed_at
            for sig, after in ((signal.SIGTERM, grace), (signal.SIGKILL, 2 * grace)):
                if waited > after and sig not in escalated:
                    escalated.append(sig)
                    signal_all(children, sig)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for thread in pumps:
        thread.join(timeout=5)
    if first_failure is None:  # all ended together (a forwarded signal, or success)
        first_failure = next(((i, c.returncode) for i, c in enumerate(children) if c.returncode),
                             None)
    for index, child in enumerate(children):
        if child.returncode:
            print(f'launch/local.py: process {index} exited with {exit_code(child.returncode)}',
                  file=sys.stderr)
    return exit_code(first_failure[1]) if first_failure else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--devices_per_process', type=int, default=4)
    parser.add_argument('--grace', type=float, default=30.0,
                        help='seconds the other processes get to exit after one fails (then '
                             'SIGTERM, and SIGKILL after as long again)')
    parser.add_argument('command', nargs=argparse.REMAINDER,
                        help='the command every process runs, after --')
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('give the command to run after --')
    return launch(command, args.processes, args.devices_per_process, args.grace)


if __name__ == '__main__':
    sys.exit(main())
