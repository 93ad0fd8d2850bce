"""Metrics: JSONL and TensorBoard writers (process 0 only), FLOP counts, peak FLOP/s and MFU, peak
memory.

- `MetricsWriter` appends one JSON object per logged step to `metrics.jsonl` and the same scalars
  to TensorBoard event files. On resume it first drops records past the restored step, so the file
  reads as one uninterrupted history.
- Model FLOPs per token follow the PaLM appendix B convention: `6 N + 12 L d T` for a training
  step (forward + backward, attention included), where N counts the parameters that take part in
  matmuls (the learned position table does not).
- Peak FLOP/s comes from a table of accelerator specs; on CPUs it is measured with a large matmul
  in the compute dtype, so CPU MFU is relative to what this machine's matmul reaches.
- Peak memory (`peak_memory_gib`): on accelerators the largest `peak_bytes_in_use` of this
  process's devices (since the process started); on CPUs, where the devices' memory is the
  process's, its peak resident set since `reset_peak_memory` (Linux's VmHWM).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gptstack.config import GPTConfig
from gptstack.data.sources import DataError
from gptstack.files import write_whole

log = logging.getLogger(__name__)
# The key of a record's non-finite values: `{key: reason}` (their own values are null).
NONFINITE = 'nonfinite_values'

# Dense bf16 peak per chip, from the vendors' spec sheets.
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5': 459e12,
    'TPU v5p': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'TPU7x': 2307e12,
    'NVIDIA A100': 312e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA B200': 2250e12,
}


def matmul_params(config: GPTConfig, lm_head: bool = True) -> int:
    """Parameters that take part in matmuls (N in 6N): all but norms, biases and positions;
    `lm_head=False` for a score model, whose head is one vector instead of the vocabulary."""
    d, f, n_layer = config.d_model, config.d_ff, config.n_layer
    attention = d * config.head_dim * (2 * config.n_head + 2 * config.n_kv_head)
    mlp = (3 if config.family == 'llama' else 2) * d * f
    head = config.vocab_size * d if lm_head else d
    return n_layer * (attention + mlp) + head


def train_flops_per_token(config: GPTConfig, seq_len: int, lm_head: bool = True) -> float:
    """Model FLOPs of one training token (forward and backward)."""
    return 6 * matmul_params(config, lm_head) + 12 * config.n_layer * config.d_model * seq_len


@functools.cache
def peak_flops_per_device(dtype: str = 'float32') -> tuple[float, str]:
    """`(FLOP/s, where the number comes from)` for one local device (measured once per
    process where no spec sheet names it)."""
    device = jax.local_devices()[0]
    for kind, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return flops, f'spec sheet ({device.device_kind})'
    return measure_matmul_flops(dtype), f'measured {dtype} matmul on {device.device_kind}'


def reset_peak_memory() -> None:
    """Starts this process's peak resident set afresh (Linux; elsewhere a no-op), so that a
    stage's peak is its own and not an earlier stage's of the same process."""
    with contextlib.suppress(OSError):
        pathlib.Path('/proc/self/clear_refs').write_text('5')


def peak_memory_gib() -> float | None:
    """The peak memory of this process's devices in GiB (see the module docstring), or None
    where neither the devices nor the OS report it."""
    peaks = [(device.memory_stats() or {}).get('peak_bytes_in_use', 0)
             for device in jax.local_devices() if device.platform != 'cpu']
    if any(peaks):
        return max(peaks) / 2**30
    try:
        status = pathlib.Path('/proc/self/status').read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines()
                if line.startswith('VmHWM:')), None)
    return None if kib is None else kib / 2**20


def measure_matmul_flops(dtype: str = 'float32', n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an n×n×n matmul (bf16 inputs accumulate in float32)."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


class MetricsWriter:
    """Writes `metrics.jsonl` and TensorBoard events under `workdir` (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / 'metrics.jsonl'
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh history
        from tensorboardX import SummaryWriter  # local: only process 0 needs it
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

    def write(self, step: int, metrics: dict) -> None:
        """Appends one record; a non-finite value is stored as `null`, its reason (`nan`, `inf`
        or `-inf`) under `NONFINITE` (`read_metrics` gives it back as a `NonFinite`)."""
        if not self.enabled:
            return
        record, nonfinite = {'step': int(step)}, {}
        for key, value in metrics.items():
            value = _scalar(value)
            if isinstance(value, float) and not math.isfinite(value):
                record[key], nonfinite[key] = None, str(value)
            else:
                record[key] = value
        if nonfinite:
            record[NONFINITE] = nonfinite
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        for key, value in record.items():
            if key != 'step' and isinstance(value, float | int):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalar(value) -> int | float:
    value = np.asarray(value)
    return int(value) if value.dtype.kind in 'iub' else float(value)


class NonFinite(float):
    """A metric that was NaN or infinite, read back from `metrics.jsonl`: that float in
    arithmetic and plots (which leave it out), `n/a (<reason>)` in a report's tables."""

    def __new__(cls, reason: str):
        value = super().__new__(cls, reason)
        value.reason = reason
        return value

    def __format__(self, spec: str) -> str:
        return f'n/a ({self.reason})'

    __str__ = __repr__ = lambda self: f"n/a ({self.reason})"


def _parse_lines(path: pathlib.Path) -> list[tuple[str, dict]]:
    """`(line, record)` of a JSONL log. A last line that does not parse is a write torn by a
    crash: it is left out, with a warning. Any other bad line is an error naming it."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise DataError(f'{path}:{number}: not a JSON record ({error.msg}); the log is '
                                'damaged') from None
            log.warning('%s: leaving out its last line, cut short by an interrupted write (%r)',
                        path, line[:60])
    return parsed


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of a run's `metrics.jsonl`, non-finite values as `NonFinite`.

    Raises:
        DataError: when the file is missing (the stage has not run here, or the file was
            deleted), or damaged before its last line.
    """
    path = pathlib.Path(workdir) / 'metrics.jsonl'
    if not path.exists():
        raise DataError(f'{path} is missing: the report is made from it (rerun the stage with '
                        'the same command to log it again)')
    records = []
    for _, record in _parse_lines(path):
        for key, reason in record.pop(NONFINITE, {}).items():
            record[key] = NonFinite(reason)
        records.append(record)
    return records


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
    """Drops the records of a JSONL log whose `step` is past `last_step` (used on resume, so
    steps redone after a restart are not logged twice) and a torn last line."""
    path = pathlib.Path(path)
    if path.exists():
        kept = [line for line, record in _parse_lines(path) if record['step'] <= last_step]
        write_whole(path, ''.join(line + '\n' for line in kept))


# --- progress bars ------------------------------------------------------------------------------
class _LinePerRedraw:
    """Standard error for a progress bar where it is not a terminal (a log file, a pipe): each
    redraw becomes a line of its own instead of a carriage return that a file keeps."""

    def write(self, text: str) -> None:
        text = text.replace('\r', '').strip('\n')
        if text.strip():
            sys.stderr.write(text + '\n')

    def flush(self) -> None:
        sys.stderr.flush()


# Where standard error is not a terminal, a bar draws at most once a minute and not at all for
# work done within the first minute.
QUIET_INTERVAL = 60.0


def progress_bar(iterable=None, **kwargs) -> tqdm.tqdm:
    """A tqdm bar on standard error: redrawn in place on a terminal; in a log, one line a
    minute (`QUIET_INTERVAL`), so short work leaves nothing and long work a line a minute."""
    if sys.stderr.isatty():
        return tqdm.tqdm(iterable, dynamic_ncols=True, **kwargs)
    return tqdm.tqdm(iterable, file=_LinePerRedraw(), mininterval=QUIET_INTERVAL,
                     delay=QUIET_INTERVAL, ncols=100, **kwargs)
