"""A multi-process run's watch on its own processes.

Every process counts up a key of the distributed runtime's key-value store, `alive/<index>`,
each `interval` seconds, and reads everyone's. When another process's count has not moved for
`silence` seconds, that process has died or hangs, and the run cannot go on: this one says so in
one line and exits 1. A process that ends normally writes `done` first, so the others do not
take the silence after it for a failure.

The runtime has a heartbeat of its own (`heartbeat_timeout`), but what it does when one is missed
is abort every process with a C++ stack trace (jax 0.10's `jax.distributed.initialize` takes no
handler for it, and the client's handler cannot be a Python function). With `silence` below the
runtime's timeout, this watch speaks first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from gptstack import environment

log = logging.getLogger(__name__)
PREFIX = 'gptstack/alive/'
DONE = 'done'


class Watchdog:
    """Started right after `jax.distributed.initialize` (see `start`); `done()` on a normal
    end. `client`: the runtime client (its `key_value_set` and `key_value_dir_get`); `leave`:
    what ends the process, given the reason (tests pass their own)."""

    def __init__(self, client, index: int, count: int, silence: float, leave=None):
        self.client, self.index, self.count, self.silence = client, index, count, silence
        self.interval = min(1.0, silence / 5)
        self._leave = leave or self._exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='gptstack-watchdog', daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def done(self) -> None:
        """Tells the others that this process ends normally and stops watching them."""
        self._stop.set()
        self._thread.join()
        # The run is over: a coordinator that has gone already changes nothing.
        with contextlib.suppress(Exception):
            self.client.key_value_set(f'{PREFIX}{self.index}', DONE, allow_overwrite=True)

    def _run(self) -> None:
        beats = 0
        seen: dict[int, str | None] = {}
        since = {p: time.monotonic() for p in range(self.count) if p != self.index}
        while not self._stop.wait(self.interval if beats else 0):
            beats += 1
            try:
                self.client.key_value_set(f'{PREFIX}{self.index}', str(beats),
                                          allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(PREFIX))
            except Exception as error:  # any failure to reach the store means the same
                return self._leave(f'the run\'s coordinator (process 0) does not answer '
                                   f'({environment.first_line(error)})')
            now = time.monotonic()
            for peer in since:
                value = values.get(f'{PREFIX}{peer}')
                if value == DONE:
                    since[peer] = now
                elif value != seen.get(peer):
                    seen[peer], since[peer] = value, now
                elif now - since[peer] > self.silence:
                    return self._leave(f'process {peer} has given no sign of life for '
                                       f'{self.silence:g} s (it died or hangs; see its log)')

    def _exit(self, reason: str) -> None:
        log.error('process %d: %s; exiting 1', self.index, reason)
        environment.exit_now(1)


def start(silence: float) -> Watchdog | None:
    """Watches the other processes of a multi-process run (None on one process)."""
    import jax
    from jax._src import distributed  # the runtime client `jax.distributed.initialize` made

    client = distributed.global_state.client
    if jax.process_count() == 1 or client is None:
        return None
    return Watchdog(client, jax.process_index(), jax.process_count(), silence).start()
