"""Device mesh, logical axis rules and the shardings derived from them.

Dimension legend (used in einsum strings and shape suffixes across the library):
    B batch, T sequence (queries), S key/value sequence, D embed (d_model), N query heads,
    K key/value heads, G query heads per kv head (N = K*G), H head dim, F MLP hidden, V vocab,
    L layers.

Every parameter carries logical axis names (`'embed'`, `'mlp'`, ...) in its `out_sharding`
metadata; activations are constrained with the same names through `constrain`. A rules preset maps
each logical name to mesh axes of the mesh `('data', 'fsdp', 'tensor')`. Resolution follows t5x: a
mesh axis already taken by an earlier dimension of the same array is skipped, so `('batch', 'seq',
'embed')` under FSDP shards the batch over `('data', 'fsdp')` and leaves `embed` whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptstack.config import ConfigError, MeshConfig

MESH_AXES = ('data', 'fsdp', 'tensor')

_BATCH = ('batch', ('data', 'fsdp'))
RULES: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    # Pure data parallelism: parameters replicated, batch split over every device.
    'dp': (_BATCH,),
    # ZeRO-3 style: parameters and optimizer state split along d_model over 'fsdp'.
    'fsdp': (_BATCH, ('embed', 'fsdp')),
    # FSDP plus Megatron-style tensor parallelism over heads, MLP hidden and vocab.
    'fsdp_tp': (_BATCH, ('embed', 'fsdp'), ('heads', 'tensor'), ('kv_heads', 'tensor'),
                ('mlp', 'tensor'), ('vocab', 'tensor')),
}

LogicalAxes = Sequence[str | None]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `('data', 'fsdp', 'tensor')` mesh, filling a -1 axis with the remaining devices.

    Raises:
        ConfigError: when the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(config.shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(
                f'mesh: the fixed axes ({_describe(config)}) multiply to {known}, which does not '
                f'divide the {len(devices)} available devices')
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f'mesh: data*fsdp*tensor = {"*".join(map(str, shape))} = {math.prod(shape)} does not '
            f'match the {len(devices)} available devices; set one axis to -1 to fill')
    # Auto axes: GSPMD propagates shardings from our annotations (the jax default is Explicit).
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def _describe(config: MeshConfig) -> str:
    return ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, config.shape, strict=True) if s != -1)


def logical_to_spec(names: LogicalAxes, rules: str) -> P:
    """Maps logical axis names to a PartitionSpec under the named rules preset."""
    table = dict(RULES[rules])
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


# --- activations --------------------------------------------------------------------------------
# The mesh and rules used by `constrain` while a step is traced; outside, `constrain` is a no-op,
# so the model also runs unsharded (tests, eager debugging).
_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, str] | None] = contextvars.ContextVar(
    'gptstack_activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: str) -> Iterator[None]:
    """Makes `constrain` shard activations over `mesh` under `rules` inside this block."""
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
    """Constrains an activation's sharding by logical axis names (no-op outside a step)."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules, x.shape))


# --- parameters and state -----------------------------------------------------------------------
def named_sharding(mesh: Mesh, names: LogicalAxes, rules: str,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """The NamedSharding for logical `names`; with `shape`, mesh axes that do not divide a
    dimension are dropped (small activations such as a batch of one are then replicated)."""
    spec = logical_to_spec(names, rules)
    if shape is not None:
        spec = P(*(_divisible(axes, dim, mesh) for axes, dim in zip(spec, shape, strict=True)))
    return NamedSharding(mesh, spec)


def _divisible(axes, dim: int, mesh: Mesh):
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else axes
    return axes if dim % math.prod(mesh.shape[a] for a in axes) == 0 else None


def param_shardings(abstract_params, mesh: Mesh, rules: str):
    """NamedShardings for an abstract `nnx.State`, read from each Variable's logical names.

    Raises:
        ConfigError: when a sharded parameter dimension is not divisible by its mesh axes.
    """
    def one(path, variable):
        names = variable.get_metadata().get('out_sharding') or (None,) * variable.ndim
        spec = logical_to_spec(names, rules)
        for dim, axes, name in zip(variable.shape, spec, names, strict=True):
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else
                                                      axes or ()))
            if dim % size:
                raise ConfigError(
                    f'parameter {jax.tree_util.keystr(path)} has {name}={dim}, which mesh axes '
                    f'{axes} of total size {size} do not divide; change the model or the mesh')
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map_with_path(one, abstract_params, is_leaf=_is_variable)


def _is_variable(x) -> bool:
    from flax import nnx  # local: keeps this module's import light for config-only users
    return isinstance(x, nnx.Variable)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: str, batch_size: int) -> NamedSharding:
    """Sharding of a `[B, T]` batch array; the batch must split evenly over data*fsdp."""
    spec = logical_to_spec(('batch', 'seq'), rules)
    shards = math.prod(mesh.shape[a] for a in spec[0])
    if batch_size % shards:
        raise ConfigError(f'batch size {batch_size} is not divisible by the {shards} batch '
                          f'shards of the mesh (data*fsdp); change the batch size or the mesh')
    return NamedSharding(mesh, spec)


def round_to_batch_shards(mesh: Mesh, n: int) -> int:
    """The smallest batch size `>= n` that splits evenly over the mesh's batch shards
    (data*fsdp)."""
    shards = math.prod(mesh.shape[a] for a in _BATCH[1])
    return shards * math.ceil(n / shards)


def describe(mesh: Mesh) -> str:
    """One line for logs: axis sizes and device kind."""
    sizes = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
    return f'{sizes} over {mesh.devices.size} {np.ravel(mesh.devices)[0].platform} devices'


def global_batch(local: dict, batch_sharding: NamedSharding | dict[str, NamedSharding]) -> dict:
    """This process's rows of a batch -> global arrays laid out by `batch_sharding` (one for
    every key, or a dict by key; on one process this is a sharded device_put)."""
    def place(key):
        return batch_sharding[key] if isinstance(batch_sharding, dict) else batch_sharding

    return {k: jax.make_array_from_process_local_data(place(k), np.asarray(v))
            for k, v in local.items()}


def to_host(tree):
    """Every array of `tree` whole, as NumPy, on every process.

    On one process this is `jax.device_get`. In a multi-process run an array split over other
    processes' devices is gathered from them (a collective: every process must call this with
    the same tree), so host code that reads a batch's outputs (decoding replies, scoring them)
    sees the same values on every process and takes the same decisions."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def barrier(name: str) -> None:
    """Waits until every process of a multi-process run gets here (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
