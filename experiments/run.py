"""The entry point of every stage.

    python -m experiments.run --config=experiments/configs/<stage>.py[:args] \
        [--config.a.b=value ...] --workdir=DIR

Parses the config (locked: an unknown key is an error), joins the multi-controller runtime when
the launch environment describes several processes, turns on the compilation cache
(`--compilation_cache`), logs versions and devices, writes the resolved config to
`<workdir>/config.json` and dispatches to the stage named by `config.stage`. Exit code
0 when the stage finished or was preempted and checkpointed; 1 with a one-line reason on bad
configuration, bad data or divergence.
"""

from __future__ import annotations

import os
import sys

if __name__ == '__main__':
    # Before anything else: glibc reads its malloc settings when a process starts.
    from gptstack import environment

    environment.reexec_tuned()

import json
import logging
import pathlib
import platform
from typing import NoReturn

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments import dpo, pipeline, pretrain, reward, rl, sft, tokenizer
from gptstack import environment, watchdog
from gptstack.config import ConfigError
from gptstack.data.sources import DataError
from gptstack.files import write_whole
from gptstack.loop import TrainingDivergedError

# The stages of the recipe in order, then DPO (which stands in for reward modelling and RL), each
# a driver module with `validate(config)` and `run(config, workdir) -> status`; `pipeline` runs
# the recipe.
RECIPE = {'tokenizer': tokenizer, 'pretrain': pretrain, 'sft': sft, 'reward': reward, 'rl': rl,
          'dpo': dpo}
STAGES = (*RECIPE, 'pipeline')
# Each run's log in its workdir, appended to by every run of the same command.
LOG = 'run.log'

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config: path.py[:args].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of this run (checkpoints, metrics, '
                                                'report); re-running with it resumes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'host:port of process 0 in a multi-process run (default $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', '1')),
    'Processes in the run (default $JAX_NUM_PROCESSES, else 1; TPU pods and SLURM are detected).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', int(os.environ.get('JAX_PROCESS_ID', '0')),
    "This process's index (default $JAX_PROCESS_ID).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'Seconds without a heartbeat after which the distributed runtime '
                              'counts a process as dead and aborts the others; the run ends '
                              'them first, in one line, after 0.6 of it (gptstack.watchdog).')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache',
    os.environ.get('JAX_COMPILATION_CACHE_DIR', str(environment.DEFAULT_COMPILATION_CACHE)),
    'Directory of compiled programs kept between runs: a resumed or repeated run loads them '
    'instead of compiling again. Empty: compile every time.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Compile the pretraining step for --topology ahead of time and print '
                           'its memory per device, FLOPs and projected speed; train nothing.')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice for --compile_only: v5p-256, '
                                                  'v5e-64, v6e-256, v4-128 or v5p:4x4x8.')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed by --compile_only.')
flags.mark_flags_as_required(['config'])

log = logging.getLogger('experiments.run')


def maybe_initialize_distributed() -> None:
    """Joins the multi-controller runtime when the run has several processes: explicit flags
    (`--num_processes`, `--process_id`, `--coordinator_address`, as `launch/local.py` passes
    them), or an environment JAX recognises (a TPU pod slice, a SLURM job with several tasks).

    A process that dies makes the others exit with one line and code 1 rather than wait in a
    collective forever: at their next collective, which fails (`abandon`), or once it has been
    silent for 0.6 `--heartbeat_timeout` seconds (`gptstack.watchdog`)."""
    env = os.environ
    explicit = _NUM_PROCESSES.value > 1
    detected = (',' in env.get('TPU_WORKER_HOSTNAMES', '')
                or int(env.get('SLURM_NTASKS', '1')) > 1)
    if not (explicit or detected):
        return
    kwargs = {'heartbeat_timeout_seconds': _HEARTBEAT_TIMEOUT.value}
    if explicit:
        if not _COORDINATOR.value:
            raise app.UsageError('--num_processes > 1 needs --coordinator_address=host:port')
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            raise app.UsageError(f'--process_id={_PROCESS_ID.value}: expected 0 <= process_id < '
                                 f'--num_processes={_NUM_PROCESSES.value}')
        kwargs.update(coordinator_address=_COORDINATOR.value,
                      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**kwargs)


def compile_only(config) -> int:
    """Compiles the pretraining step for `--topology` and prints per-device memory, FLOPs and
    the projected speed; exit code 1 when it does not fit the chip's memory."""
    from gptstack import aot

    if not _TOPOLOGY.value:
        raise app.UsageError('--compile_only needs --topology (e.g. v5p-256, v5e-64, v6e-256)')
    if config.stage == 'pipeline':
        config = config.pretrain
    if config.stage != 'pretrain':
        log.error('--compile_only compiles the pretraining step; config.stage=%r', config.stage)
        return 1
    try:
        report = aot.compile_pretrain_step(config, _TOPOLOGY.value, _MFU.value)
    except ConfigError as error:
        log.error('ConfigError: %s', error)
        return 1
    print(aot.describe(report), flush=True)
    return 0 if report.fits else 1


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once: the later stages of a pipeline that read the
    same data repeat its warnings, which the console then shows once (the run log keeps every
    one)."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


def keep_log(path: pathlib.Path) -> None:
    """Appends this process's log to `path` (process 0), with the details the console leaves
    out: every skipped record and every prompt cut to the context (`gptstack` loggers at DEBUG),
    and every repeat of a message. The console keeps INFO and above, each message once."""
    if jax.process_index() != 0:
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    handler.setLevel(logging.DEBUG)
    for handler_ in logging.getLogger().handlers:  # the console's (absl's)
        handler_.setLevel(max(handler_.level, logging.INFO))
        handler_.addFilter(OncePerMessage())
    logging.getLogger().addHandler(handler)
    logging.getLogger('gptstack').setLevel(logging.DEBUG)


def log_environment(config, cache: str) -> None:
    import flax
    import grain
    import optax
    import orbax.checkpoint

    versions = {'python': platform.python_version(), 'jax': jax.__version__,
                'flax': flax.__version__, 'optax': optax.__version__,
                'orbax': orbax.checkpoint.__version__, 'grain': grain.__version__}
    log.info('versions: %s', ' '.join(f'{k}={v}' for k, v in versions.items()))
    log.info('process environment: %s; %s', environment.describe_malloc(), cache)
    log.info('stage %s on process %d of %d; %d local / %d global %s devices (%s)', config.stage,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count(), jax.default_backend(), jax.devices()[0].device_kind)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config = _CONFIG.value
    if _COMPILE_ONLY.value:
        # Compile for a TPU through libtpu's compile-only devices, on the CPU, alongside any
        # other JAX process, without asking a (missing) metadata server about the machine.
        for name, value in (('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'), ('TPU_SKIP_MDS_QUERY', '1')):
            os.environ.setdefault(name, value)
    # No TPU or GPU here (or only a compile): JAX computes on the CPU without probing for them,
    # so libtpu prints nothing.
    environment.cpu_without_accelerators(always=_COMPILE_ONLY.value)
    maybe_initialize_distributed()
    # Below the runtime's own timeout, which would abort every process with a C++ stack trace.
    watch = watchdog.start(silence=0.6 * _HEARTBEAT_TIMEOUT.value)
    try:
        return run_stage(config)
    finally:
        if watch is not None:
            watch.done()


def run_stage(config) -> int:
    """Runs `config`'s stage (or pipeline, or compile-only check) in this process; the exit
    code."""
    logging.getLogger().setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    # orbax logs every file it writes through absl at INFO; keep its warnings only.
    logging.getLogger('absl').setLevel(logging.WARNING)
    # Sharded random numbers must not depend on the mesh (the default in recent jax; explicit).
    jax.config.update('jax_threefry_partitionable', True)
    if config.stage not in STAGES:
        log.error('config.stage=%r: expected one of %s', config.stage, sorted(STAGES))
        return 1
    if _COMPILE_ONLY.value:
        return compile_only(config)
    if not _WORKDIR.value:
        raise app.UsageError('--workdir is required (except with --compile_only)')
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    keep_log(workdir / LOG)
    log_environment(config, environment.use_compilation_cache(_COMPILATION_CACHE.value))
    if jax.process_index() == 0:
        write_whole(workdir / 'config.json',
                    json.dumps(config.to_dict(), indent=1, default=str) + '\n')
    try:
        if config.stage == 'pipeline':
            status = pipeline.run(config, workdir, RECIPE)
        else:
            status = RECIPE[config.stage].run(config, workdir)
    except (ConfigError, DataError, TrainingDivergedError) as error:
        log.error('%s: %s', type(error).__name__, error)
        return 1
    except Exception as error:
        if jax.process_count() == 1:
            raise
        abandon(error)
    report = workdir / 'report.md'
    log.info('stage %s %s; %s', config.stage, status,
             f'report {report}' if report.exists() else f'workdir {workdir}')
    return 0


def abandon(error: Exception) -> NoReturn:
    """Ends this process of a multi-process run that cannot go on, with exit code 1 at once.

    An ordinary exit would wait at the distributed runtime's shutdown barrier for every process,
    and one that has died never comes: after `--heartbeat_timeout` seconds the runtime aborts
    this one with a C++ stack trace. When another process dies, the first collective after it
    fails here (its link is closed); that gets one line, since its traceback says nothing about
    the cause. Any other error keeps its traceback."""
    if isinstance(error, jax.errors.JaxRuntimeError):
        log.error('process %d: a collective with the other processes failed, so one of them has '
                  'probably stopped (see its log); exiting 1. %s', jax.process_index(),
                  environment.first_line(error, 'no detail'))
    else:
        log.exception('process %d: %s; exiting 1', jax.process_index(), type(error).__name__)
    environment.exit_now(1)


if __name__ == '__main__':
    sys.exit(app.run(main))
