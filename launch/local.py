"""Runs one command as N processes of a multi-controller JAX job on this machine.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        python -m experiments.run --config=experiments/configs/pretrain.py:runlocal \
        --workdir=workdirs/two_processes

Each process sees `--devices_per_process` CPU devices and finds the others through a
coordinator on localhost (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
which `experiments.run` reads), so the job's global mesh spans every process's devices exactly as
it would span the hosts of a TPU pod slice. Output lines carry the process index. When one
process fails, the others are stopped after `--grace` seconds and the launcher exits with the
failed process's code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


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


def launch(command: list[str], processes: int, devices: int, grace: float) -> int:
    port = free_port()
    children = [subprocess.Popen(command, env=process_env(i, processes, devices, port),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(processes)]
    pumps = [threading.Thread(target=pump, args=(i, c.stdout, sys.stdout), daemon=True)
             for i, c in enumerate(children)]
    for thread in pumps:
        thread.start()
    failed_at = None
    try:
        while any(c.poll() is None for c in children):
            failed = [c for c in children if c.returncode not in (None, 0)]
            if failed and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for child in children:
                    if child.poll() is None:
                        child.terminate()
            time.sleep(0.1)
    except KeyboardInterrupt:  # pass Ctrl-C on: every process checkpoints and stops
        for child in children:
            child.send_signal(2)
        for child in children:
            child.wait()
    for thread in pumps:
        thread.join(timeout=5)
    codes = [c.returncode for c in children]
    for index, code in enumerate(codes):
        if code:
            print(f'launch/local.py: process {index} exited with {code}', file=sys.stderr)
    return next((code for code in codes if code), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--devices_per_process', type=int, default=4)
    parser.add_argument('--grace', type=float, default=30.0,
                        help='seconds the other processes get to exit after one fails')
    parser.add_argument('command', nargs=argparse.REMAINDER,
                        help='the command every process runs, after --')
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('give the command to run after --')
    return launch(command, args.processes, args.devices_per_process, args.grace)


if __name__ == '__main__':
    sys.exit(main())
