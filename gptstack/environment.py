"""The process environment and platform a run computes in: glibc's malloc settings, the
compilation cache, and the precision policy and attention kernel chosen for the platform.

- Malloc: XLA:CPU allocates and frees large temporaries at every step. glibc's defaults return
  them to the kernel and fault them in again (20-40% of a training step), and its many arenas cost
  training steps another ~10%. The settings are read once, when a process starts, so
  `experiments.run` re-executes itself with them before doing anything else (`reexec_tuned`);
  `benchmarks` starts each of its processes with the same ones. A `GLIBC_TUNABLES` that the
  caller set is kept.
- Compilation cache (`use_compilation_cache`): JAX's persistent cache of compiled programs, on
  by default in `experiments.run`. A resumed stage, a re-run, and the pipeline's PPO runs of one
  shape load their programs instead of compiling them again (the quick pipeline's second run takes
  a third of the first's time); the numbers are bit for bit those of a fresh compile.
- Precision (`PRECISIONS`): which dtypes the matmuls and activations run in. `auto` picks the
  fastest policy that keeps the loss equal: `bfloat16` on accelerators; on CPUs, `mixed`
  (bfloat16 matmul inputs, float32 everything else) where the CPU has bfloat16 matrix instructions
  (AVX512-BF16 or AMX) and `float32` where it has not, since without them XLA:CPU's bfloat16
  matmuls are slower than float32 ones (docs/performance.md).
- Attention (`attention`): on GPUs cuDNN's fused kernel through `jax.nn.dot_product_attention`
  where it compiles (else that function's XLA implementation, the reason in the log); on CPUs and
  TPUs this repository's kernel.
- Platforms (`cpu_without_accelerators`): with `libtpu` installed (the `test` extra brings it for
  ahead-of-time TPU compiles) JAX probes for a TPU when it starts, and on a machine without one
  libtpu prints a page of initialisation errors. Where JAX's own PCI scan finds no TPU chip and no
  GPU device is visible, and the caller has not chosen platforms, a run is told to compute on the
  CPU, so the probe never runs; compiling for a TPU topology loads libtpu by itself all the same.
- Ending a process at once (`exit_now`): a process of a multi-process run that cannot go on
  skips the runtime's shutdown barrier, where it would wait for a peer that has died.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Callable
from typing import NoReturn

# Keep XLA's temporaries mapped between steps instead of returning them to the kernel and
# faulting them in again.
KEEP_MAPPED = ('glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:'
               'glibc.malloc.trim_threshold=100000000000:glibc.malloc.top_pad=536870912')
# One malloc arena: a further ~10% on training steps (and so on a PPO iteration, two thirds of
# which is its update), at a cost of 15-25% to a batch-16 decoding loop.
ONE_ARENA = KEEP_MAPPED + ':glibc.malloc.arena_max=1'
# Set in a process that `reexec_tuned` started, so it does not start another.
MARKER = 'GPTSTACK_MALLOC'

# Where compiled programs are kept between runs unless `--compilation_cache` or
# $JAX_COMPILATION_CACHE_DIR names another place; the least recently used are dropped past the cap.
DEFAULT_COMPILATION_CACHE = pathlib.Path(
    os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache')) / 'gptstack' / 'xla'
COMPILATION_CACHE_BYTES = 4 << 30

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


def use_compilation_cache(directory: str | os.PathLike | None) -> str:
    """Keeps compiled programs in `directory` (none: compile every time) and returns the line the
    start-up log shows. Call before the first compilation."""
    import jax

    if not directory:
        jax.config.update('jax_enable_compilation_cache', False)
        return 'compilation cache off'
    jax.config.update('jax_compilation_cache_dir', str(directory))
    jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_BYTES)
    return f'compilation cache {directory} (programs that took over ' \
           f'{jax.config.jax_persistent_cache_min_compile_time_secs:g} s to compile)'


def start_tool() -> None:
    """What a command-line tool other than `experiments.run` (sampling, ranking, export) sets
    before JAX starts: the CPU alone where there is no accelerator, and the compilation cache
    the runner uses, with its cap. (A process that wrote the shared cache without the cap would
    leave entries without the access times that a capped one reads when it evicts.)"""
    cpu_without_accelerators()
    use_compilation_cache(os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                         str(DEFAULT_COMPILATION_CACHE)))


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


def attention(platform: str, matmul_dtype: str,
              cudnn_error: Callable[[str], str | None] | None = None) -> tuple[str, str]:
    """`(implementation, why)` of a sequence attending to itself (`GPTConfig.attention`) on
    `platform`: on GPUs cuDNN's fused kernel where it compiles for `matmul_dtype` inputs, else
    `jax.nn.dot_product_attention`'s XLA implementation, `why` saying what cuDNN answered; on CPUs
    and TPUs this repository's kernel, which keeps XLA:CPU on its fast bfloat16 matmuls (and
    which XLA fuses on TPUs). `cudnn_error(dtype)` is None where cuDNN compiles (default: it
    compiles a small attention, `cudnn_attention_error`)."""
    if platform != 'gpu':
        return 'gptstack', f'{platform}: gptstack.ops.dot_product_attention'
    if matmul_dtype not in ('bfloat16', 'float16'):
        return 'xla', f'cuDNN attention takes bfloat16 or float16 inputs, not {matmul_dtype}'
    error = (cudnn_error or cudnn_attention_error)(matmul_dtype)
    if error:
        return 'xla', f'cuDNN attention is not available here: {error}'
    return 'cudnn', 'cuDNN fused attention'


def cudnn_attention_error(dtype: str) -> str | None:
    """None if cuDNN's fused attention compiles on this machine for `dtype` inputs with a
    boolean mask (what the model passes), else the first line of the reason."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, 128, 2, 64), dtype)
    mask = jnp.ones((1, 1, 128, 128), bool)
    try:
        jax.jit(lambda q: jax.nn.dot_product_attention(
            q, q, q, mask=mask, implementation='cudnn')).lower(x).compile()
    except Exception as error:
        return first_line(error, type(error).__name__)
    return None


def cpu_without_accelerators(always: bool = False) -> bool:
    """Restricts JAX to the CPU (call it before JAX starts its backends) where there is no TPU
    chip, NVIDIA GPU or ROCm device, or `always`, unless `JAX_PLATFORMS` names the platforms;
    True if it did."""
    if 'JAX_PLATFORMS' in os.environ or 'JAX_FORCE_TPU_INIT' in os.environ:
        return False
    if not always:
        try:
            from jax._src import hardware_utils
        except ImportError:  # another JAX layout: let JAX probe
            return False
        tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        if tpu_chips or hardware_utils.has_visible_nvidia_gpu() or os.path.exists('/dev/kfd'):
            return False
    import jax

    jax.config.update('jax_platforms', 'cpu')
    return True


def first_line(error: BaseException, default: str = '') -> str:
    """The first line of an error's message (the runtime's errors carry pages of context)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default


def exit_now(code: int = 1) -> NoReturn:
    """Flushes the logs and ends this process with `code` at once: no atexit handlers, no
    shutdown barrier of the distributed runtime."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
