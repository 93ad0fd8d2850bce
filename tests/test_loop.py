"""The host loop's non-finite handling: `python -m pytest -q tests/test_loop.py`."""

import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptstack import loop
from gptstack.checkpoint import Checkpointer
from gptstack.metrics import MetricsWriter, read_metrics
from gptstack.steps.lm import keep_if_finite


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: jax.Array


def run_loop(tmp_path, bad_steps, checkpointer_cls=Checkpointer, batches=None, evaluate=None,
             time_spent=None, **config):
    """A loop over a fake step whose loss is NaN at `bad_steps` (it then keeps the params)."""
    def step_fn(state, batch):
        bad = jnp.isin(state.step + 1, jnp.asarray(bad_steps))
        params = jnp.where(bad, state.params, state.params + batch)
        metrics = {'loss': jnp.where(bad, jnp.nan, 1.0 / (state.step + 1)),
                   'nonfinite': bad.astype(jnp.float32)}
        return ToyState(step=state.step + 1, params=params), metrics

    checkpointer = checkpointer_cls(tmp_path / 'ckpt', async_save=False)
    writer = MetricsWriter(tmp_path, enabled=True)
    try:
        return loop.train(
            state=ToyState(step=jnp.int32(0), params=jnp.zeros(())), step_fn=jax.jit(step_fn),
            batches=batches or iter(lambda: jnp.ones(()), None), checkpointer=checkpointer,
            writer=writer, evaluate=evaluate, time_spent=time_spent,
            workdir=tmp_path, config=loop.LoopConfig(**{'total_steps': 8, 'log_every': 1,
                                                        'checkpoint_every': 2, **config}))
    finally:
        writer.close()
        checkpointer.close()


def test_nonfinite_stops_and_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.TrainingDivergedError) as error:
        run_loop(tmp_path, [5])
    assert str(error.value) == (
        'non-finite loss or gradient at step 5; the update was not applied; the last good '
        f'checkpoint is {tmp_path / "ckpt" / "4"} (step 4)')


class SlowDiskCheckpointer(Checkpointer):
    """A save that lands on disk only once waited for, as an asynchronous save to a slow disk."""

    in_flight = None

    def save(self, step, state, **kwargs):
        self.wait()
        self.in_flight = (step, state, kwargs)

    def wait(self):
        if self.in_flight is not None:
            step, state, kwargs = self.in_flight
            self.in_flight = None
            super().save(step, state, **kwargs)
        super().wait()


def test_divergence_waits_for_the_save_in_flight_and_names_it(tmp_path):
    with pytest.raises(loop.TrainingDivergedError) as error:
        run_loop(tmp_path, [5], checkpointer_cls=SlowDiskCheckpointer, checkpoint_every=4)
    assert str(error.value).endswith(f'the last good checkpoint is {tmp_path / "ckpt" / "4"} '
                                     '(step 4)')
    assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == ['4']


def test_an_exception_in_a_step_still_lands_the_save_in_flight(tmp_path):
    def failing_batches():
        for _ in range(3):
            yield jnp.ones(())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_loop(tmp_path, [], checkpointer_cls=SlowDiskCheckpointer, checkpoint_every=2,
                 batches=failing_batches())
    assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == ['2']


def test_nonfinite_batches_are_skipped_and_counted(tmp_path):
    result = run_loop(tmp_path, [3, 6], on_nonfinite='skip', max_nonfinite_skips=2)
    assert result.status == 'finished' and result.nonfinite_skips == 2
    assert float(result.state.params) == 6.0  # 8 steps, 2 updates refused
    logged = read_metrics(tmp_path)
    assert [r['nonfinite_skips'] for r in logged][-1] == 2
    assert all(np.isfinite(r['loss']) for r in logged if 'loss' in r)
    # The first step's time, compilation included, is reported once.
    assert [r['step'] for r in logged if 'time/first_step' in r] == [1]
    assert logged[0]['time/first_step'] > 0


def test_too_many_skips_stop_the_run(tmp_path):
    with pytest.raises(loop.TrainingDivergedError, match=r'at step 6 after 1 skipped batches'):
        run_loop(tmp_path, [3, 6], on_nonfinite='skip', max_nonfinite_skips=1)


def test_keep_if_finite_refuses_the_update():
    @flax.struct.dataclass
    class WithOpt:
        step: jax.Array
        params: jax.Array
        opt_state: jax.Array

    old = WithOpt(step=jnp.int32(4), params=jnp.ones(3), opt_state=jnp.zeros(3))
    kept = keep_if_finite(jnp.bool_(False), old, jnp.full(3, jnp.nan), jnp.full(3, 9.0))
    np.testing.assert_array_equal(kept.params, 1.0)
    np.testing.assert_array_equal(kept.opt_state, 0.0)
    assert int(kept.step) == 5
    taken = keep_if_finite(jnp.bool_(True), old, jnp.full(3, 2.0), jnp.full(3, 9.0))
    np.testing.assert_array_equal(taken.params, 2.0)


def test_early_stopping_keeps_the_best_and_a_resumed_run_stays_stopped(tmp_path):
    losses = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.2, 10: 1.0}  # step -> val_loss

    def run(total_steps, state, early_stopping=None):
        checkpointer = Checkpointer(tmp_path / 'ckpt', keep=1, async_save=False)
        writer = MetricsWriter(tmp_path, enabled=True)
        try:
            return loop.train(
                state=state, step_fn=jax.jit(lambda s, b: (ToyState(s.step + 1, s.params + b),
                                                           {'loss': s.params})),
                batches=iter(lambda: jnp.ones(()), None), checkpointer=checkpointer,
                writer=writer, workdir=tmp_path, evaluate=lambda s: {
                    'val_loss': losses[int(s.step)]},
                config=loop.LoopConfig(total_steps=total_steps, eval_every=2,
                                       checkpoint_every=2, patience=2),
                early_stopping=early_stopping), checkpointer
        finally:
            writer.close()

    (result, checkpointer) = run(10, ToyState(step=jnp.int32(0), params=jnp.zeros(())))
    # 2.5 and 2.2 did not beat 2.0: it stops at step 8, and step 4 is kept as the best.
    assert result.status == 'finished' and result.step == 8
    assert checkpointer.best_step() == 4 and checkpointer.latest_step() == 8
    meta = checkpointer.read_meta(8)
    assert meta['early_stopping'] == {'best_val_loss': 2.0, 'evals_since_best': 2,
                                      'stopped': True}
    checkpointer.close()
    # Resumed from its last checkpoint, the stopped run does no more steps.
    again, checkpointer = run(10, result.state, meta['early_stopping'])
    assert again.step == 8 and checkpointer.latest_step() == 8
    checkpointer.close()


def test_the_time_split_counts_data_evaluation_and_checkpoints_and_carries_on(tmp_path):
    def slow_batches():
        while True:
            time.sleep(0.01)
            yield jnp.ones(())

    def evaluate(state):
        time.sleep(0.1)
        return {'val_loss': 1.0}

    run_loop(tmp_path, [], batches=slow_batches(), evaluate=evaluate, eval_every=4,
             time_spent={'checkpoints': 100.0})
    records = [r for r in read_metrics(tmp_path) if 'loss' in r]
    assert [r['step'] for r in records] == list(range(1, 9))
    for part in loop.SPLIT:
        values = [r[f'time/{part}'] for r in records]
        assert values == sorted(values), part  # totals so far
    last = records[-1]
    assert last['time/data'] >= 0.08  # eight batches
    assert 0.1 <= last['time/evaluation'] < 0.2  # step 4's; step 8's comes after its record
    assert last['time/checkpoints'] > 100.0  # carried on from the run before
    meta = Checkpointer(tmp_path / 'ckpt').read_meta(8)  # saved after step 8's evaluation
    assert meta['time_spent']['evaluation'] >= 0.2
    assert meta['time_spent']['data'] + meta['time_spent']['evaluation'] < meta['wall_time']
