"""The one host training loop that every stage runs: batches -> jitted step -> metrics ->
periodic evaluation -> periodic samples -> checkpoints.

- Stages differ only in the step function, the batches and the optional `evaluate` / `sample`
  callbacks; cadence, logging, checkpointing and preemption live here once.
- Metrics of step k are fetched after step k+1 has been dispatched, so the host never stalls the
  device just to log. Each logged value is the mean over the steps since the previous log.
- The step itself refuses non-finite updates (it reports `nonfinite`); the loop then stops with
  the step number and the last good checkpoint, or skips the batch when configured to, counting
  skips up to a cap.
- SIGTERM/SIGINT (preemption, Ctrl-C): the current step finishes, a checkpoint is written, and
  the loop returns `'preempted'`; re-running the same command resumes. A second signal stops at
  once.
- Only process 0 shows the progress bar and writes metrics; every process takes part in
  checkpoints.
- Where the time goes: every logged record carries, besides `wall_time`, the seconds spent so far
  waiting for batches, evaluating, writing samples and saving checkpoints (`time/<part>` for the
  parts of `SPLIT`); the rest of `wall_time` is the steps themselves. A resumed run carries them on
  from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import signal
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from gptstack import environment
from gptstack.checkpoint import Checkpointer
from gptstack.config import ConfigError
from gptstack.metrics import MetricsWriter, peak_memory_gib, progress_bar

log = logging.getLogger(__name__)
# The parts of a run's time that are not its steps.
SPLIT = ('data', 'evaluation', 'samples', 'checkpoints')


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When the loop logs, evaluates, samples and saves (in steps; 0 disables)."""

    total_steps: int
    log_every: int = 10
    eval_every: int = 200
    sample_every: int = 0
    checkpoint_every: int = 500
    # What a non-finite loss or gradient does: 'stop' the run, or 'skip' the batch.
    on_nonfinite: str = 'stop'
    max_nonfinite_skips: int = 10
    # Early stopping: evaluations in a row without a lower `val_loss` after which training
    # stops (0: never); the checkpointer keeps the best one.
    patience: int = 0

    def __post_init__(self):
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ConfigError(f'train.total_steps={self.total_steps!r}: expected a positive '
                              'integer')
        for name in ('log_every', 'eval_every', 'sample_every', 'checkpoint_every',
                     'max_nonfinite_skips', 'patience'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f'train.{name}={value!r}: expected an integer >= 0 (0 '
                                  'disables)')
        if self.on_nonfinite not in ('stop', 'skip'):
            raise ConfigError(f'train.on_nonfinite={self.on_nonfinite!r}: expected stop or skip')

    @classmethod
    def from_dict(cls, train) -> LoopConfig:
        """From a stage's `train` settings (`keep_checkpoints` belongs to the checkpointer)."""
        values = {k: v for k, v in dict(train).items() if k != 'keep_checkpoints'}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f'train: unknown key(s) {unknown}')
        return cls(**values)


class TrainingDivergedError(RuntimeError):
    """A non-finite loss or gradient that the configuration does not allow skipping."""


@dataclasses.dataclass
class LoopResult:
    state: object
    status: str  # 'finished' or 'preempted'
    step: int
    last_eval: dict
    nonfinite_skips: int


class _StopSignal:
    """Turns the first SIGTERM/SIGINT into a request to stop after the current step."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        log.warning('%s received: finishing the current step, then saving a checkpoint',
                    self.signal_name)
        for sig, handler in self._previous.items():  # a second signal acts immediately
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(*, state, step_fn: Callable, batches: Iterator[dict], config: LoopConfig,
          checkpointer: Checkpointer, writer: MetricsWriter, workdir: str | pathlib.Path,
          data_iterator=None, evaluate: Callable[[object], dict] | None = None,
          sample: Callable[[object], list[dict]] | None = None,
          checkpoint_meta: dict | None = None, tokens_per_step: int = 0,
          flops_per_step: float = 0.0, peak_flops: float = 0.0,
          wall_time_offset: float = 0.0, time_spent: dict | None = None,
          early_stopping: dict | None = None) -> LoopResult:
    """Runs `step_fn` from `state.step` to `config.total_steps`.

    Args:
        state: the train state; `state.step` says where to start (0, or a restored step).
        step_fn: jitted `step(state, batch) -> (state, metrics)`; metrics may hold `nonfinite`.
        batches: yields device-ready batches (the next one after `state.step`).
        data_iterator: the grain iterator behind `batches`, saved with every checkpoint.
        evaluate: `evaluate(state) -> {name: float}`; `val_loss` ranks the best checkpoint.
        sample: `sample(state) -> [{'prompt', 'completion', ...}]`, written to samples.jsonl.
        tokens_per_step, flops_per_step, peak_flops: for tokens/s and MFU (0 leaves them out).
        wall_time_offset: seconds spent before a resume, so `wall_time` counts the whole run.
        time_spent: the same for `SPLIT` (from the checkpoint resumed from).
        early_stopping: the early-stopping record of the checkpoint resumed from (its best
            `val_loss`, the evaluations since, whether it stopped); a stopped run stays stopped.
    """
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    start = int(jax.device_get(state.step))
    last_eval: dict = {}
    skips = 0
    pending = None
    window_start, window_steps = None, 0
    window_sums: dict[str, float] = {}
    window_count = 0
    first_step: dict[str, float] = {}
    clock_start = time.perf_counter()
    record = {'best_val_loss': None, 'evals_since_best': 0, 'stopped': False,
              **(early_stopping or {})}
    spent = {part: (time_spent or {}).get(part, 0.0) for part in SPLIT}

    def wall_time() -> float:
        return wall_time_offset + time.perf_counter() - clock_start

    @contextlib.contextmanager
    def timed(part: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            spent[part] += time.perf_counter() - begin

    def save(step: int, val_loss: float | None = None):
        with timed('checkpoints'):
            meta = {**(checkpoint_meta or {}), 'nonfinite_skips': skips,
                    'wall_time': wall_time(), 'time_spent': dict(spent),
                    'early_stopping': dict(record)}
            checkpointer.save(step, state, data_iterator=data_iterator, meta=meta,
                              val_loss=val_loss)

    def finish_step(step: int, metrics) -> None:
        """Fetches a dispatched step's metrics, checks them, logs them at the cadence."""
        nonlocal skips, window_start, window_steps, window_sums, window_count
        metrics = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        skipped = bool(metrics.pop('nonfinite', 0.0))
        if skipped:
            if config.on_nonfinite == 'stop' or skips >= config.max_nonfinite_skips:
                checkpointer.wait()  # a save in flight lands first: the step named is on disk
                last = checkpointer.latest_step()
                where = (f'the last good checkpoint is {checkpointer.path(last)} (step {last})'
                         if last is not None else 'there is no checkpoint yet')
                reason = ('' if config.on_nonfinite == 'stop' else
                          f' after {skips} skipped batches (max_nonfinite_skips)')
                raise TrainingDivergedError(
                    f'non-finite loss or gradient at step {step}{reason}; '
                    f'the update was not applied; {where}')
            skips += 1
            log.warning('non-finite loss or gradient at step %d: batch skipped (%d so far)',
                        step, skips)
        if not skipped:  # a skipped batch's loss is not finite: keep it out of the means
            for key, value in metrics.items():
                window_sums[key] = window_sums.get(key, 0.0) + value
            window_count += 1
        now = time.perf_counter()
        if window_start is None:  # the first step includes compilation: time from its end
            window_start = now
            first_step['time/first_step'] = now - clock_start
            log.debug('step %d (the first of this process, compilation included) took %.1f s',
                     step, first_step['time/first_step'])
        else:
            window_steps += 1
        if (config.log_every and step % config.log_every == 0) or step == config.total_steps:
            # Means over the window; a window of only skipped batches logs no loss at all.
            metrics = {k: v / window_count for k, v in window_sums.items()} if window_count else {}
            window_sums, window_count = {}, 0
            if window_steps:
                elapsed = now - window_start
                if tokens_per_step:
                    metrics['tokens_per_sec'] = tokens_per_step * window_steps / elapsed
                if flops_per_step and peak_flops:
                    metrics['mfu'] = flops_per_step * window_steps / elapsed / peak_flops
                metrics['step_time'] = elapsed / window_steps
                window_start, window_steps = now, 0
            metrics.update(first_step)  # in the first record only
            first_step.clear()
            metrics['nonfinite_skips'] = skips
            metrics['wall_time'] = wall_time()
            metrics.update({f'time/{part}': seconds for part, seconds in spent.items()})
            peak = peak_memory_gib()
            if peak is not None:
                metrics['memory/peak_gib'] = peak
            writer.write(step, metrics)
            bar.set_postfix({k: f'{metrics[k]:.4g}' for k in ('loss', 'tokens_per_sec', 'mfu')
                             if k in metrics}, refresh=False)

    bar = progress_bar(total=config.total_steps, initial=start, unit='step', disable=not is_main,
                       desc='train')
    status = 'finished'
    if record['stopped']:
        log.info('training stopped early at step %d (no lower val_loss in %d evaluations)',
                 start, record['evals_since_best'])
    last = start if record['stopped'] else config.total_steps
    # Every way out (the end, a signal, divergence, an exception, Ctrl-C) waits for the save in
    # flight, so the checkpoints on disk are whole and the latest one is the last saved.
    with _StopSignal() as stop, _saves_landed(checkpointer):
        for step in range(start + 1, last + 1):
            with timed('data'):
                batch = next(batches)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                finish_step(*pending)
            pending = (step, metrics)
            bar.update(1)
            evaluating = ((config.eval_every and step % config.eval_every == 0)
                          or step == config.total_steps) and evaluate is not None
            saving = ((config.checkpoint_every and step % config.checkpoint_every == 0)
                      or step == config.total_steps or stop.signal_name)
            if evaluating or saving or (config.sample_every and step % config.sample_every == 0):
                finish_step(*pending)
                pending = None
            if evaluating:
                with timed('evaluation'):
                    last_eval = {k: float(v) for k, v in evaluate(state).items()}
                writer.write(step, last_eval)
                log.info('step %d: %s', step, ' '.join(f'{k}={v:.4g}'
                                                        for k, v in last_eval.items()))
                record['stopped'] = _no_better(record, last_eval.get('val_loss'),
                                               config.patience)
                saving = saving or record['stopped']
            if sample is not None and ((config.sample_every and step % config.sample_every == 0)
                                       or step == config.total_steps):
                with timed('samples'):
                    _write_samples(workdir, step, sample(state), is_main)
            if saving:
                save(step, last_eval.get('val_loss') if evaluating else None)
            if stop.signal_name:
                status = 'preempted'
                break
            if record['stopped']:
                log.info('step %d: no lower val_loss in %d evaluations; stopping (the best, '
                         '%.4g, is kept)', step, record['evals_since_best'],
                         record['best_val_loss'])
                break
        if pending is not None:
            finish_step(*pending)
    bar.close()
    checkpointer.wait()
    final = int(jax.device_get(state.step))
    if status == 'preempted':
        log.warning('stopped by %s at step %d; checkpoint saved in %s. Re-run the same command '
                    'to resume.', stop.signal_name, final, checkpointer.path(final))
    return LoopResult(state, status, final, last_eval, skips)


@contextlib.contextmanager
def _saves_landed(checkpointer: Checkpointer):
    """Waits for the checkpoint saves in flight however the loop ends. When it ends by an error,
    a wait that fails as well is logged in one line and the first error, the cause, goes on. A
    failed collective of a multi-process run (another process has died) skips the wait: a save
    needs every process, so it could only time out; its unfinished folder is cleared at the next
    start."""
    try:
        yield
    except jax.errors.JaxRuntimeError:
        if jax.process_count() == 1:
            checkpointer.wait()
        raise
    except BaseException:
        try:
            checkpointer.wait()
        except Exception as error:  # the error being raised matters more
            log.warning('a checkpoint save in flight did not finish: %s',
                        environment.first_line(error, type(error).__name__))
        raise
    checkpointer.wait()


def _no_better(record: dict, val_loss: float | None, patience: int) -> bool:
    """Updates the early-stopping `record` with an evaluation's `val_loss`; True when
    `patience` evaluations in a row have not lowered it."""
    if val_loss is None:
        return False
    if record['best_val_loss'] is None or val_loss < record['best_val_loss']:
        record['best_val_loss'], record['evals_since_best'] = val_loss, 0
    else:
        record['evals_since_best'] += 1
    return bool(patience) and record['evals_since_best'] >= patience


def _write_samples(workdir: pathlib.Path, step: int, samples: list[dict], is_main: bool) -> None:
    if not is_main:
        return
    with open(workdir / 'samples.jsonl', 'a') as f:
        for sample in samples:
            f.write(json.dumps({'step': step, **sample}) + '\n')
    for sample in samples[:3]:
        log.info('sample at step %d: %r -> %r', step, sample.get('prompt'),
                 sample.get('completion'))
