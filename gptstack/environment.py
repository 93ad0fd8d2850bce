"""The process environment and platform a run computes in: glibc's malloc settings, and the
precision policy chosen for the platform.

- Malloc: XLA:CPU allocates and frees large temporaries at every step. glibc's defaults return
  them to the kernel and fault them in again (20-40% of a training step), and its many arenas cost
  training steps another ~10%. The settings are read once, when a process starts, so
  `experiments.run` re-executes itself with them before doing anything else (`reexec_tuned`);
  `benchmarks` starts each of its processes with the same ones. A `GLIBC_TUNABLES` that the
  caller set is kept.
- Precision (`PRECISIONS`): which dtypes the matmuls and activations run in. `auto` picks the
  fastest policy that keeps the loss equal: `bfloat16` on accelerators; on CPUs, `mixed`
  (bfloat16 matmul inputs, float32 everything else) where the CPU has bfloat16 matrix instructions
  (AVX512-BF16 or AMX) and `float32` where it has not, since without them XLA:CPU's bfloat16
  matmuls are slower than float32 ones (docs/performance.md).
"""

from __future__ import annotations

import os
import pathlib
import sys

# Keep XLA's temporaries mapped between steps instead of returning them to the kernel and
# faulting them in again.
KEEP_MAPPED = ('glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:'
               'glibc.malloc.trim_threshold=100000000000:glibc.malloc.top_pad=536870912')
# One malloc arena: a further ~10% on training steps (and so on a PPO iteration, two thirds of
# which is its update), at a cost of 15-25% to a batch-16 decoding loop.
ONE_ARENA = KEEP_MAPPED + ':glibc.malloc.arena_max=1'
# Set in a process that `reexec_tuned` started, so it does not start another.
MARKER = 'GPTSTACK_MALLOC'

# CPU flags of bfloat16 matrix instructions, on which XLA:CPU's bfloat16 matmuls are fast.
BF16_MATMUL_FLAGS = frozenset({'avx512_bf16', 'amx_bf16'})
PRECISIONS = {
    'float32': {'dtype': 'float32', 'matmul_dtype': 'float32'},
    'mixed': {'dtype': 'float32', 'matmul_dtype': 'bfloat16'},
    'bfloat16': {'dtype': 'bfloat16', 'matmul_dtype': 'bfloat16'},
}


def reexec_tuned(tunables: str = ONE_ARENA) -> None:
    """Replaces this process by the same command with `GLIBC_TUNABLES=tunables`, unless the
    caller set its own or this process was started that way. Call it first thing: nothing done
    before it survives."""
    if MARKER in os.environ or 'GLIBC_TUNABLES' in os.environ or not sys.platform.startswith(
            'linux'):
        return
    env = {**os.environ, 'GLIBC_TUNABLES': tunables, MARKER: 'set by experiments.run'}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe_malloc() -> str:
    """One line for the start-up log: the malloc settings and who chose them."""
    tunables = os.environ.get('GLIBC_TUNABLES')
    if tunables is None:
        return 'GLIBC_TUNABLES unset (glibc defaults)'
    who = os.environ.get(MARKER, "the caller's")
    return f'GLIBC_TUNABLES={tunables} ({who})'


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), or none where they cannot be read."""
    path = pathlib.Path('/proc/cpuinfo')
    if not path.exists():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith('flags'):
            return set(line.split(':', 1)[1].split())
    return set()


def auto_precision(platform: str, flags: set[str]) -> str:
    """The policy `auto` means on `platform` (`jax.default_backend()`) with these CPU flags."""
    if platform != 'cpu':
        return 'bfloat16'
    return 'mixed' if flags & BF16_MATMUL_FLAGS else 'float32'


def precision(name: str, platform: str) -> tuple[str, dict[str, str]]:
    """`(policy name, {dtype, matmul_dtype})` for a config's `precision` (`auto` resolved)."""
    if name == 'auto':
        name = auto_precision(platform, cpu_flags())
    return name, dict(PRECISIONS[name])
