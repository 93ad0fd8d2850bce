"""What every stage driver shares, so that a driver's `run()` is wiring: build, train, report.

- `setup(config)` checks the settings every training stage has (mesh, optimizer, loop, batch)
  before any work, and derives the mesh, the batch placement, the precision policy and the peak
  FLOP/s for MFU.
- Where a stage starts from (an earlier stage's workdir or a Hugging Face directory) is
  `gptstack.lineage`'s part.
- `obtain_tokenizer` gives pretraining its tokenizer: the configured one, the workdir's own (a
  resumed run) or one trained on the corpus mixture.
- `Trainable` is a model under training before any array exists (graphdef, abstract state,
  shardings, optimizer); `Stage.start` restores it from the run's latest checkpoint or creates it,
  and `Stage.train` runs the shared loop with the metrics writer and checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptstack import environment, loop, sharding
from gptstack.checkpoint import Checkpointer, abstract_with_shardings
from gptstack.config import (
    COMPUTE_FIELDS,
    ConfigError,
    GPTConfig,
    MeshConfig,
    OptimConfig,
    check_bounds,
)
from gptstack.data import sources
from gptstack.data.tokenizer import Tokenizer, train_tokenizer
from gptstack.lineage import Workdir
from gptstack.metrics import MetricsWriter, peak_flops_per_device, truncate_jsonl
from gptstack.optim import make_optimizer
from gptstack.state import (
    ModelFn,
    TrainState,
    abstract_model,
    abstract_train_state,
    state_shardings,
)

log = logging.getLogger(__name__)


# --- set-up ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
    """What every training stage derives from its config before doing any work."""

    mesh: jax.sharding.Mesh
    rules: str
    optim: OptimConfig
    loop: loop.LoopConfig
    batch_sharding: jax.sharding.NamedSharding
    peak_flops: float
    peak_source: str
    # The compute policy: its name and the `GPTConfig` fields it sets (dtype, matmul_dtype).
    precision: str
    policy: dict

    def computing(self, model_config: GPTConfig) -> GPTConfig:
        """`model_config` computing in this run's precision (what the parameters are stays)."""
        return dataclasses.replace(model_config, **self.policy)


def setup(config) -> Setup:
    """Validates the ranges of the numeric keys, the mesh, optimizer, loop and batch settings
    (cheap; fails with the key)."""
    check_bounds(config)
    mesh_config = MeshConfig.from_dict(config.mesh)
    optim_config = OptimConfig.from_dict(config.optim)
    loop_config = loop.LoopConfig.from_dict(config.train)
    mesh = sharding.make_mesh(mesh_config)
    if config.data.batch_size % optim_config.accum_steps:
        raise ConfigError(f'data.batch_size={config.data.batch_size} is not divisible by '
                          f'optim.accum_steps={optim_config.accum_steps}')
    if config.data.batch_size % jax.process_count():
        raise ConfigError(f'data.batch_size={config.data.batch_size} must divide over the '
                          f'{jax.process_count()} processes')
    batch_sharding = sharding.batch_sharding(mesh, mesh_config.rules, config.data.batch_size)
    if config.get('precision', 'auto') not in ('auto', *environment.PRECISIONS):
        raise ConfigError(f'precision={config.precision!r}: expected auto or one of '
                          f'{sorted(environment.PRECISIONS)}')
    precision, policy = environment.precision(config.get('precision', 'auto'),
                                              jax.default_backend())
    dtypes = ', '.join(f'{k} {v}' for k, v in policy.items())
    policy['attention'], why = environment.attention(jax.default_backend(),
                                                     policy['matmul_dtype'])
    described = (f'mesh: {sharding.describe(mesh)}, rules {mesh_config.rules}; precision '
                 f'{precision} ({dtypes}); attention {policy["attention"]} ({why})')
    # Once per process unless it changes (the pipeline sets up every stage twice).
    log.log(logging.DEBUG if described in _DESCRIBED else logging.INFO, described)
    _DESCRIBED.add(described)
    # MFU is against the peak of the dtype the matmuls run in.
    peak, source = peak_flops_per_device(policy['matmul_dtype'])
    return Setup(mesh, mesh_config.rules, optim_config, loop_config, batch_sharding,
                 peak * jax.device_count(), source, precision, policy)


_DESCRIBED: set[str] = set()


def check_seq_len(seq_len: int, model_config: GPTConfig, whose: str = 'the model') -> None:
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f'data.seq_len={seq_len} exceeds {whose}\'s max_seq_len='
                          f'{model_config.max_seq_len}')


def check_compatible(meta: dict, tokenizer: Tokenizer, model_config: GPTConfig, where) -> None:
    """Refuses a checkpoint trained with another tokenizer or model shape. The saved config is
    read back as a `GPTConfig` (fields it predates take their defaults), and the compute policy
    (`COMPUTE_FIELDS`) may differ."""
    if meta.get('tokenizer_sha256') != tokenizer.sha256:
        raise ConfigError(f'{where} was trained with tokenizer sha256 '
                          f'{meta.get("tokenizer_sha256")}, but this run uses {tokenizer.sha256}')
    if 'model' not in meta:
        raise ConfigError(f'{where} records no model config')
    saved = dataclasses.asdict(GPTConfig.from_dict(meta['model']))
    current = dataclasses.asdict(model_config)
    diff = sorted(k for k in current if k not in COMPUTE_FIELDS and saved[k] != current[k])
    if diff:
        raise ConfigError(f'{where} has a different model config: ' + ', '.join(
            f'{k}={saved[k]!r} there vs {current[k]!r} here' for k in diff))


# --- the tokenizer --------------------------------------------------------------------------
def train_tokenizer_on(config) -> tuple[Tokenizer, dict]:
    """A tokenizer trained on every document of `config.data.sources`, and its statistics,
    including `documents`: {source name: [texts]}."""
    budget = sources.SkipBudget(config.data.max_skips)
    start = time.perf_counter()
    documents = {spec.name: list(sources.read_source(spec, budget))
                 for spec in sources.specs_from_config(config.data.sources)}
    read_time = time.perf_counter() - start
    tokenizer = train_tokenizer((d for docs in documents.values() for d in docs),
                                config.tokenizer.vocab_size,
                                max_lines=config.tokenizer.max_lines, seed=config.seed)
    stats = dict(documents=documents, read_seconds=read_time,
                 train_seconds=time.perf_counter() - start - read_time,
                 skipped=dict(budget.by_reason))
    return tokenizer, stats


def obtain_tokenizer(config, workdir: Workdir) -> Tokenizer:
    """The tokenizer a stage runs with, copied into its workdir so the lineage is on disk."""
    target = workdir.tokenizer_path
    # Every process looks before any writes: one that came later would find process 0's file
    # and skip the barrier the others wait at.
    sharding.barrier('tokenizer looked for')
    if config.tokenizer.path:
        if not pathlib.Path(config.tokenizer.path).is_file():
            raise ConfigError(f'tokenizer.path={config.tokenizer.path}: no such file (give a '
                              'tokenizer.model or a Hugging Face tokenizer.json, or leave the '
                              'key unset to train one)')
        tokenizer = Tokenizer.load(config.tokenizer.path)
        if target.exists() and Tokenizer.load(target).sha256 != tokenizer.sha256:
            raise ConfigError(f'tokenizer.path={config.tokenizer.path} differs from {target}, '
                              'which this workdir was trained with; use a new workdir')
    elif target.exists():
        return Tokenizer.load(target)
    elif jax.process_count() > 1:  # process 0 trains it; the others read it from the workdir
        if jax.process_index() == 0:
            train_tokenizer_on(config)[0].save(target)
        sharding.barrier('tokenizer trained')
        return Tokenizer.load(target)
    else:
        tokenizer, stats = train_tokenizer_on(config)
        log.info('trained a %d-token tokenizer in %.1f s', tokenizer.vocab_size,
                 stats['train_seconds'])
    if jax.process_index() == 0:
        workdir.save_tokenizer(tokenizer)
    sharding.barrier('tokenizer saved')
    return tokenizer


# --- state and the loop ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Trainable:
    """A model under training before any array exists: its graphdef, the abstract train state,
    the state's shardings and the optimizer."""

    model_fn: ModelFn
    graphdef: object
    abstract_state: TrainState
    shardings: TrainState
    tx: object
    schedule: Callable

    @classmethod
    def create(cls, model_fn: ModelFn, optim: OptimConfig, mesh, rules: str) -> Trainable:
        tx, schedule = make_optimizer(optim)
        abstract_state = abstract_train_state(model_fn, tx)
        return cls(model_fn, abstract_model(model_fn)[0], abstract_state,
                   state_shardings(abstract_state, mesh, rules, tx), tx, schedule)

    def abstract_params(self, within: str | None = None):
        """The abstract parameters placed by their shardings: a restore target."""
        params, shardings = self.abstract_state.params, self.shardings.params
        if within:
            params, shardings = params[within], shardings[within]
        return abstract_with_shardings(params, shardings)

    def from_params(self, params) -> TrainState:
        """Step 0 with `params` and a fresh optimizer, in the state's shardings."""
        return jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                            opt_state=self.tx.init(p)),
                       out_shardings=self.shardings)(params)


def resume(checkpointer: Checkpointer, abstract_state, shardings, tokenizer: Tokenizer,
           model_config: GPTConfig, data_iterator):
    """`(state, its checkpoint's metadata)` from the run's latest intact checkpoint, restored
    onto `shardings` with the data iterator, or None for a fresh run.

    A checkpoint of another tokenizer or model shape is refused (ConfigError). One that cannot
    be read (damaged on disk) is moved aside, never deleted, with a warning, and the one before
    it is restored instead.
    """
    abstract = abstract_with_shardings(abstract_state, shardings)
    for step in sorted(checkpointer.all_steps(), reverse=True):
        try:
            meta = checkpointer.read_meta(step)
        except Exception as error:
            checkpointer.set_aside(step, error)
            continue
        check_compatible(meta, tokenizer, model_config, checkpointer.path(step))
        try:
            state, meta = checkpointer.restore(step, abstract, data_iterator=data_iterator)
        except Exception as error:
            checkpointer.set_aside(step, error)
            continue
        log.info('resuming from %s (step %d)', checkpointer.path(step), step)
        return state, meta
    return None


class Stage:
    """One training stage's run in its workdir: its checkpoints, its metrics and the loop.

    `start` restores the state from the latest checkpoint (with the data iterator) or makes it
    with `init`; `train` runs `loop.train` with every setting the stages share and closes the
    writer and checkpointer unless told to keep them for work after the loop.
    """

    def __init__(self, config, workdir: str | os.PathLike, setup_: Setup):
        self.config, self.workdir, self.setup = config, Workdir(workdir), setup_
        self.checkpointer = Checkpointer(self.workdir.checkpoints,
                                         keep=config.train.keep_checkpoints)
        self.resumed_from = self.checkpointer.latest_step()
        self.resumed_meta: dict = {}
        self.writer: MetricsWriter | None = None

    def start(self, abstract_state, shardings, tokenizer: Tokenizer, model_config: GPTConfig,
              data_iterator, init: Callable[[], object]):
        resumed = resume(self.checkpointer, abstract_state, shardings, tokenizer, model_config,
                         data_iterator)
        self.resumed_from = self.checkpointer.latest_step()  # after any damaged one went aside
        if resumed is None:
            return init()
        state, self.resumed_meta = resumed
        return state

    @property
    def wall_offset(self) -> float:
        """Seconds the run spent before this process resumed it."""
        return self.resumed_meta.get('wall_time', 0.0)

    def metrics(self) -> MetricsWriter:
        """The run's metrics writer (on resume, records past the restored step are dropped)."""
        if self.writer is None:
            self.writer = MetricsWriter(self.workdir.path, resume_step=self.resumed_from)
            truncate_jsonl(self.workdir.samples, self.resumed_from or 0)
        return self.writer

    def meta(self, tokenizer: Tokenizer, model_config: GPTConfig, **extra) -> dict:
        """What every checkpoint of this run records besides the state."""
        return {'model': dataclasses.asdict(model_config), 'tokenizer_sha256': tokenizer.sha256,
                'seed': self.config.seed, 'config': self.config.to_dict(), **extra}

    def train(self, state, step_fn, batches, data_iterator, *, meta: dict, evaluate=None,
              sample=None, tokens_per_step: int = 0, flops_per_step: float = 0.0,
              keep_open: bool = False) -> loop.LoopResult:
        writer = self.metrics()
        result = loop.train(
            state=state, step_fn=step_fn, batches=batches, data_iterator=data_iterator,
            config=self.setup.loop, checkpointer=self.checkpointer, writer=writer,
            workdir=self.workdir.path, evaluate=evaluate, sample=sample, checkpoint_meta=meta,
            tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
            peak_flops=self.setup.peak_flops if flops_per_step else 0.0,
            wall_time_offset=self.wall_offset,
            time_spent=self.resumed_meta.get('time_spent'),
            early_stopping=self.resumed_meta.get('early_stopping'))
        if not keep_open:
            self.close()
        return result

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.checkpointer.close()

    def finished(self, result: loop.LoopResult) -> bool:
        """Whether the stage ran to its last step, here on the process that writes reports."""
        return result.status == 'finished' and jax.process_index() == 0
