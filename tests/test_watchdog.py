"""The multi-process watchdog against a key-value store held in memory: a process that stops
counting is reported after the silence, one that says it is done is not."""

import threading
import time

from gptstack.watchdog import DONE, PREFIX, Watchdog


class Store:
    """The two calls of the runtime client the watchdog makes."""

    def __init__(self):
        self.values, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.values[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def watch(store, peers_beat_until, silence=0.4, seconds=2.0):
    """Process 0 of 3 watched while processes 1 and 2 count up until their given times (None:
    throughout, or a value such as DONE written at that time); the reasons it would exit."""
    reasons = []
    left = threading.Event()

    def leave(reason):
        reasons.append(reason)
        left.set()

    dog = Watchdog(store, 0, 3, silence, leave=leave).start()
    start = time.monotonic()
    beats = 0
    while time.monotonic() - start < seconds and not left.is_set():
        beats += 1
        now = time.monotonic() - start
        for peer, (until, last) in peers_beat_until.items():
            if until is None or now < until:
                store.key_value_set(f'{PREFIX}{peer}', str(beats), allow_overwrite=True)
            elif last is not None:
                store.key_value_set(f'{PREFIX}{peer}', last, allow_overwrite=True)
        time.sleep(0.02)
    dog.done()  # before the simulated peers' silence after this loop
    return reasons, time.monotonic() - start


def test_a_process_that_falls_silent_is_reported_after_the_silence():
    store = Store()
    reasons, elapsed = watch(store, {1: (None, None), 2: (0.3, None)}, seconds=4.0)
    assert reasons == ['process 2 has given no sign of life for 0.4 s (it died or hangs; see '
                       'its log)']
    assert 0.7 <= elapsed < 3.0  # silent from 0.3 s, reported after 0.4 s more
    assert store.values[f'{PREFIX}0'] == DONE  # the watcher's own normal end


def test_a_process_that_is_done_or_keeps_counting_is_not_reported():
    reasons, _ = watch(Store(), {1: (None, None), 2: (0.3, DONE)}, seconds=1.5)
    assert reasons == []


def test_a_store_that_does_not_answer_is_the_coordinator_gone():
    class Gone(Store):
        def key_value_dir_get(self, prefix):
            raise RuntimeError('UNAVAILABLE: failed to connect to all addresses\nmore')

    reasons, _ = watch(Gone(), {1: (None, None), 2: (None, None)}, seconds=1.0)
    assert reasons == ["the run's coordinator (process 0) does not answer (UNAVAILABLE: failed "
                       'to connect to all addresses)']
