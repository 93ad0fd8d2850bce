"""The train state pytree and its creation directly in its final sharding.

`TrainState(step, params, opt_state)` is a plain pytree: `params` is the Param-only `nnx.State`
of the model and `opt_state` the optax state. Shardings come from the logical axis names on the
parameters (through `gptstack.sharding`), never by hand, and the state is created by a jitted
init with those `out_shardings`, so no device ever holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gptstack import sharding

ModelFn = Callable[[nnx.Rngs], nnx.Module]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def abstract_model(model_fn: ModelFn) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and abstract params (ShapeDtypeStructs), allocating nothing."""
    # Shardings are applied by our own rules when the state is created, not eagerly by NNX.
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def init_params(model_fn: ModelFn, key: jax.Array) -> nnx.State:
    """Real parameters (call under jit to create them sharded)."""
    with nnx.use_eager_sharding(False):
        model = model_fn(nnx.Rngs(params=key))
    return nnx.split(model, nnx.Param)[1]


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules: str,
                    tx: optax.GradientTransformation) -> TrainState:
    """Shardings for every leaf: params from their logical names, optimizer moments like their
    parameters, and everything else (step, counters) replicated."""
    params = sharding.param_shardings(abstract_state.params, mesh, rules)
    opt_state = optax.tree_map_params(
        tx, lambda _, s: s, abstract_state.opt_state, params,
        transform_non_params=lambda _: sharding.replicated(mesh))
    return TrainState(step=sharding.replicated(mesh), params=params, opt_state=opt_state)


def _init_fn(model_fn: ModelFn, tx: optax.GradientTransformation):
    def init(key: jax.Array) -> TrainState:
        params = init_params(model_fn, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def abstract_train_state(model_fn: ModelFn, tx: optax.GradientTransformation) -> TrainState:
    """The `TrainState` as ShapeDtypeStructs (a restore target once given shardings)."""
    return jax.eval_shape(_init_fn(model_fn, tx), jax.random.key(0))


def create_train_state(model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh,
                       rules: str, key: jax.Array):
    """Creates the train state born sharded over `mesh`.

    Returns:
        `(graphdef, state, shardings)`: the model graphdef for `nnx.merge`, the `TrainState`,
        and the matching tree of NamedShardings (used as the step's in/out shardings).
    """
    graphdef, _ = abstract_model(model_fn)
    shardings = state_shardings(abstract_train_state(model_fn, tx), mesh, rules, tx)
    state = jax.jit(_init_fn(model_fn, tx), out_shardings=shardings)(key)
    return graphdef, state, shardings
