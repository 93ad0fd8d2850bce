"""Ahead-of-time compilation of the pretraining step for a TPU slice, on any machine.

`libtpu` (from PyPI) compiles for a TPU topology without the chips: `jax.experimental.topologies`
describes the slice as compile-only devices, the step is lowered with abstract inputs laid out
over a mesh of those devices, and XLA's compiled program reports what one chip would hold
(parameters, optimizer state and batch as arguments, activations as temporaries) and the FLOPs
it would execute. A config that does not fit the chip's HBM is caught here, before a slice is
ever reserved.

Slices are named as Cloud TPU names them: `v5p-256` (v4 and v5p count TensorCores, two per
chip), `v5e-256` and `v6e-256` (one core per chip), or by their topology, `v5p:4x4x8`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

from gptstack import environment, sharding
from gptstack.checkpoint import abstract_with_shardings
from gptstack.config import ConfigError, GPTConfig, MeshConfig, OptimConfig
from gptstack.metrics import train_flops_per_token
from gptstack.model import GPT, count_params
from gptstack.optim import make_optimizer
from gptstack.state import abstract_model, abstract_train_state, state_shardings
from gptstack.steps.lm import BATCH_KEYS, make_lm_step

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    hbm_bytes: int
    # Dense bfloat16 matmul peak, FLOP/s per chip (Cloud TPU documentation).
    peak_flops: float
    # TensorCores per chip counted by the slice name (v4-8 and v5p-8 are four chips).
    cores_in_name: int
    # Axes of the chip torus.
    dims: int


CHIPS = {
    'v4': Chip('TPU v4', 32 * GiB, 275e12, 2, 3),
    'v5e': Chip('TPU v5e', 16 * GiB, 197e12, 1, 2),
    'v5p': Chip('TPU v5p', 95 * GiB, 459e12, 2, 3),
    'v6e': Chip('TPU v6e', 32 * GiB, 918e12, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    generation: str
    chips: int
    topology: str

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]


def parse_slice(name: str) -> Slice:
    """`v5p-256` or `v5p:4x4x8` -> the slice (generation, chips, torus shape)."""
    match = re.fullmatch(r'(v4|v5e|v5p|v6e)([-:])([0-9x]+)', name)
    if not match:
        raise ConfigError(f'topology {name!r}: expected a slice like v5p-256, v5e-64, v6e-256, '
                          f'v4-128 or a torus like v5p:4x4x8 (generations {sorted(CHIPS)})')
    generation, sep, size = match.groups()
    chip = CHIPS[generation]
    if sep == ':':
        shape = [int(d) for d in size.split('x')]
        if len(shape) != chip.dims:
            raise ConfigError(f'topology {name!r}: {generation} is a {chip.dims}-D torus')
        return Slice(name, generation, math.prod(shape), size)
    count = int(size)
    chips, rest = divmod(count, chip.cores_in_name)
    if rest or chips < 1 or chips & (chips - 1):
        raise ConfigError(f'topology {name!r}: expected a power-of-two number of chips')
    shape = [1] * chip.dims
    for _ in range(int(math.log2(chips))):  # double the smallest axis, last axes first
        axis = min(range(chip.dims), key=lambda a: (shape[a], -a))
        shape[axis] *= 2
    shape = sorted(d for d in shape if d > 1) + [d for d in shape if d == 1]  # 2x2x1, 4x4x8
    return Slice(name, generation, chips, 'x'.join(map(str, shape)))


def topology_devices(slice_: Slice) -> list:
    """Compile-only devices of the slice (needs `libtpu`)."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform='tpu', topology_name=(
            f'{slice_.generation}:{slice_.topology}'))
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f'cannot describe TPU topology {slice_.name} ({error}); is libtpu '
                          "installed? pip install -e '.[tpu]'") from error
    return list(topology.devices)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    slice: Slice
    devices: int
    mesh: str
    parameters: int
    # Per device, from XLA's memory analysis.
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm_bytes: int
    # Per device, from XLA's cost analysis, and the 6N+attention formula for the whole step.
    xla_flops: float
    formula_flops: float
    tokens_per_step: int
    mfu: float
    # Set when the compiler itself refused the program for lack of memory.
    compiler_error: str | None = None

    @property
    def total_bytes(self) -> int:
        """Peak per-device bytes: inputs, outputs not aliased to donated inputs, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.compiler_error is None and self.total_bytes <= self.hbm_bytes

    @property
    def step_seconds(self) -> float:
        """Projected step time at the stated MFU."""
        return self.formula_flops / (self.slice.chips * self.slice.chip.peak_flops * self.mfu)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds


def lower_pretrain_step(model_config: GPTConfig, optim_config: OptimConfig, mesh, rules: str,
                        batch_size: int, seq_len: int):
    """`(lowered step, abstract params)`: the pretraining step lowered for `mesh` on abstract
    state and batch (shapes and shardings only; nothing is allocated or run)."""
    tx, schedule = make_optimizer(optim_config)
    model_fn = lambda rngs: GPT(model_config, rngs=rngs)  # noqa: E731
    graphdef, abstract_params = abstract_model(model_fn)
    abstract_state = abstract_train_state(model_fn, tx)
    shardings = state_shardings(abstract_state, mesh, rules, tx)
    step = make_lm_step(graphdef, tx, schedule, mesh, rules, shardings, batch_size,
                        optim_config.accum_steps)
    batch_sharding = sharding.batch_sharding(mesh, rules, batch_size)
    batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding)
             for key in BATCH_KEYS}
    return step.lower(abstract_with_shardings(abstract_state, shardings), batch), abstract_params


def compile_pretrain_step(config, topology: str, mfu: float = 0.4) -> CompileReport:
    """Compiles the pretraining step of a pretrain `config` for a TPU slice, without the slice.

    The model's vocabulary is `model.vocab_size`, or the tokenizer's configured size when that is
    None (no tokenizer is trained); data, tokenizer and checkpoints are not touched.
    """
    slice_ = parse_slice(topology)
    devices = topology_devices(slice_)
    mesh_config = MeshConfig.from_dict(config.mesh)
    mesh = sharding.make_mesh(mesh_config, devices=devices)
    rules = mesh_config.rules
    model = {**config.model.to_dict(), **environment.precision(config.precision, 'tpu')[1]}
    model['vocab_size'] = model['vocab_size'] or config.tokenizer.vocab_size
    model_config = GPTConfig.from_dict(model)
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    lowered, abstract_params = lower_pretrain_step(
        model_config, OptimConfig.from_dict(config.optim), mesh, rules, batch_size, seq_len)
    tokens = batch_size * seq_len
    report = functools.partial(
        CompileReport, slice=slice_, devices=len(devices), mesh=sharding.describe(mesh),
        parameters=count_params(abstract_params),
        hbm_bytes=slice_.chip.hbm_bytes * slice_.chips // len(devices),
        formula_flops=train_flops_per_token(model_config, seq_len) * tokens,
        tokens_per_step=tokens, mfu=mfu)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses what cannot fit
        if 'RESOURCE_EXHAUSTED' not in str(error):
            raise
        message = next(line for line in str(error).splitlines() if line.strip())
        return report(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0,
                      xla_flops=math.nan, compiler_error=message)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return report(argument_bytes=memory.argument_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes,
                  alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                  xla_flops=float(cost.get('flops', math.nan)))


def describe(report: CompileReport) -> str:
    """The report as the lines `--compile_only` prints."""
    chip = report.slice.chip
    if report.compiler_error:
        return '\n'.join([
            f'{report.slice.name}: {report.slice.chips} x {chip.kind} ({report.slice.topology}), '
            f'{report.devices} devices; mesh {report.mesh}',
            f'model: {report.parameters:,} parameters; step: {report.tokens_per_step:,} tokens',
            f'memory per device: DOES NOT FIT ({report.compiler_error})'])
    return '\n'.join([
        f'{report.slice.name}: {report.slice.chips} x {chip.kind} ({report.slice.topology}), '
        f'{report.devices} devices; mesh {report.mesh}',
        f'model: {report.parameters:,} parameters; step: {report.tokens_per_step:,} tokens',
        f'memory per device: arguments {report.argument_bytes / GiB:.2f} GiB + outputs '
        f'{report.output_bytes / GiB:.2f} GiB - donated {report.alias_bytes / GiB:.2f} GiB + '
        f'temporaries {report.temp_bytes / GiB:.2f} GiB = {report.total_bytes / GiB:.2f} GiB of '
        f'{report.hbm_bytes / GiB:.1f} GiB HBM ({report.total_bytes / report.hbm_bytes:.0%}): '
        + ('fits' if report.fits else 'DOES NOT FIT'),
        f'FLOPs per step: {report.formula_flops:.3e} (6N + attention formula, all devices); '
        f'XLA cost analysis {report.xla_flops:.3e} per device '
        f'(x{report.devices} = {report.xla_flops * report.devices:.3e})',
        f'projected at {report.mfu:.0%} MFU ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip): '
        f'{report.step_seconds:.3f} s per step, {report.tokens_per_second:,.0f} tokens/s',
    ])
