"""Checkpoints: the train state, the data-iterator state and run metadata, through orbax.

- One orbax `CheckpointManager` per run under `<workdir>/checkpoints/`. Each step directory holds
  `state` (the `TrainState`, written by every process for its own shards), `data` (the grain
  iterator state, one small JSON per process) and `meta` (JSON: step, tokens seen, the resolved
  config, the RNG seed, the tokenizer's sha256).
- Saves are asynchronous: `save` returns once the state is copied to host memory and the write
  goes on in the background; `wait` blocks until it is on disk.
- Atomic: orbax writes into a temporary directory and renames it when complete, so a crash in the
  middle of a save leaves the previous checkpoint as the latest one.
- Keeps the last `keep` checkpoints plus the one with the best validation loss.
- Restores onto any mesh: the caller passes the abstract state with the *new* shardings.
- All randomness in gptstack is `fold_in(key(seed), step)`, so the seed in `meta` is the whole RNG
  state.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptstack import sharding

BEST_METRIC = 'val_loss'
log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `{state, data, meta}` checkpoints of one run."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 local: bool = False):
        """`local`: this process alone, for reading (a report that process 0 writes): it never
        waits for the other processes of a multi-process run, as a shared manager does."""
        self.directory = pathlib.Path(directory).absolute()
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preserve, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=not local, create=not local,
                **({'multiprocessing_options': ocp.options.MultiprocessingOptions(
                    primary_host=jax.process_index(),
                    active_processes={jax.process_index()})} if local else {})),
            item_names=('state', 'data', 'meta'))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step of the lowest validation loss, or None if no kept step has one."""
        scored = [(meta[BEST_METRIC], step) for step in self.all_steps()
                  if (meta := self.read_meta(step)).get(BEST_METRIC) is not None]
        return min(scored)[1] if scored else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state, *, data_iterator: grain.DatasetIterator | None = None,
             meta: dict | None = None, val_loss: float | None = None) -> None:
        """Starts an asynchronous save of `state` (plus iterator state and metadata) at `step`."""
        meta = {'step': int(step), **(meta or {})}
        if val_loss is not None:
            meta[BEST_METRIC] = float(val_loss)
        items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        metrics = None if val_loss is None else {BEST_METRIC: float(val_loss)}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state, *,
                data_iterator: grain.DatasetIterator | None = None):
        """Restores the state at `step` into the shardings of `abstract_state`.

        Args:
            abstract_state: pytree of `jax.ShapeDtypeStruct` with `sharding` set (see
                `abstract_with_shardings`); it fixes the structure, dtypes and placement.
            data_iterator: restored in place to continue with the next batch after `step`.

        Returns:
            `(state, meta)`.
        """
        items = {'state': ocp.args.StandardRestore(abstract_state),
                 'meta': ocp.args.JsonRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_dir = self.path(step) / 'data'
            own = data_dir / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
            # A file of another number of processes serves as well: every process iterates the
            # same global stream and keeps its rows of each batch
            # (`gptstack.data.pretrain.process_rows`), so any process's state is every one's.
            saved = [own] if own.exists() else sorted(data_dir.glob('process_0-of-*.json'))
            if not saved:
                raise FileNotFoundError(f'{data_dir} holds no data-iterator state')
            data_iterator.set_state(iterator_state(json.loads(saved[0].read_text())))
        return restored['state'], restored['meta']

    def restore_params(self, step: int, abstract_params, within: tuple[str, ...] = ()):
        """Restores only `state.params` (no optimizer state is read): for sampling, evaluation
        and initialising a later stage. `abstract_params` carries the target shardings;
        `within` names the train state holding them in a larger state (`('actor',)` for the
        policy of a PPO checkpoint)."""
        item = {'params': abstract_params}
        for name in reversed(within):
            item = {name: item}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))['state']
        for name in within:
            restored = restored[name]
        return restored['params']

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored['meta']

    def set_aside(self, step: int, error: BaseException) -> pathlib.Path:
        """Moves a checkpoint that cannot be read to `<step>.damaged` beside the others (kept
        for inspection, out of the manager's sight) and says so in one line."""
        target = self.directory / f'{step}.damaged'
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f'{step}.damaged{n}'
        if jax.process_index() == 0:
            self.path(step).rename(target)
        sharding.barrier(f'checkpoint {step} set aside')
        self.manager.reload()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning('checkpoint %s cannot be read (%s: %s); moved to %s, trying the one before',
                    self.path(step), type(error).__name__, reason[:200], target)
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def iterator_state(saved):
    """A grain iterator's state as `get_state()` gave it, from the JSON it was saved as.

    JSON turns the `(start, stop)` tuples of a packed source's `remainder_slices` into lists,
    and grain compares them with its empty-slice tuple `(-1, -1)`: read back as a list, an empty
    remainder counts as one, and the restored stream replays a row. That happens whenever a
    checkpoint comes before some source of the mixture was first drawn from (the first steps,
    or a small weight), and the resumed run trains on other rows than an uninterrupted one."""
    if isinstance(saved, dict):
        return {key: ({name: tuple(part) for name, part in value.items()}
                      if key == 'remainder_slices' else iterator_state(value))
                for key, value in saved.items()}
    if isinstance(saved, list):
        return [iterator_state(item) for item in saved]
    return saved


def abstract_with_shardings(abstract_state, shardings):
    """`ShapeDtypeStruct`s of `abstract_state` placed by the matching `shardings` tree."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
