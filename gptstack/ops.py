"""Kernels for the model's matmuls and attention, shaped for XLA:CPU's fast bf16 path.

On CPUs with bf16 matrix units, XLA:CPU hands a matmul to its fast library only when both inputs
are bf16, the contracted dimension sits where the library wants it (a weight laid out
`[contracted..., free...]`, no transposed left operand) and the product is a matrix-matrix one.
Anything else runs in float32 on XLA's generic path, 2-3x slower. Plain einsums
and autodiff miss that path in three places, which the functions here avoid:

- The backward pass of a matmul with bf16 inputs gets a float32 gradient and so runs mixed
  float32 x bf16: `matmul` casts the gradient to the matmul dtype in a custom VJP
  (`_reduced_precision_matmul`) and keeps bf16 residuals, half the memory of float32 ones.
- A transposed weight (a backward pass's `grad @ weight.T`, a tied embedding's logits) is slow:
  `_weight_product` transposes it first, behind a barrier, which costs little.
- Attention's matmuls have their heads as a second batch axis and, when decoding one token,
  a single query row: `dot_product_attention` folds heads into one batch axis, stacks the
  query heads that share a key/value head and doubles a lone query row; its self-attention
  backward pass (`_self_attention`) runs four bf16 matmuls, with the transposed operands of dK
  and dV materialised as padded copies XLA cannot fold back (`_transposed_product`).

Every product accumulates in float32: the kernels change how XLA runs the products, not what
they compute. `KVCache` holds the keys and values that decoding attends to, in blocks along the
slot axis, so that a decoding step reads only the blocks in use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --- matmuls ------------------------------------------------------------------------------------
def matmul(spec: str, x: Array, weight: Array, dtype, out_dtype=None) -> Array:
    """`einsum(spec, x, weight)` with both inputs in `dtype` (the config's `matmul_dtype`) and
    float32 accumulation, returned in `out_dtype` (default: `x`'s dtype). Below float32 the
    backward pass runs in `dtype` as well (`_reduced_precision_matmul`)."""
    out_dtype = out_dtype or x.dtype
    if jnp.dtype(dtype) == jnp.float32:
        y = jnp.einsum(spec, x.astype(dtype), weight.astype(dtype),
                       preferred_element_type=jnp.float32)
    else:
        y = _reduced_precision_matmul(spec, jnp.dtype(dtype).name, jnp.dtype(x.dtype).name,
                                      jnp.dtype(weight.dtype).name)(x, weight)
    return y.astype(out_dtype)


@functools.cache
def _reduced_precision_matmul(spec: str, dtype: str, x_dtype: str, weight_dtype: str):
    """`einsum(spec)` with inputs in `dtype` and float32 accumulation in the forward pass and in
    both backward matmuls, whose incoming gradient is cast to `dtype` too. Left to autodiff,
    the backward matmuls would take a float32 gradient and run mixed float32 x bfloat16, which
    misses the fast path on CPUs with bf16 matrix units. The residuals are the inputs in
    `dtype`, half the activation memory of float32 ones."""
    inputs, out = spec.split('->')
    x_spec, w_spec = inputs.split(',')
    dx_spec, dw_spec = f'{out},{w_spec}->{x_spec}', f'{x_spec},{out}->{w_spec}'

    def forward(x, weight):
        x, weight = x.astype(dtype), weight.astype(dtype)
        return _weight_product(spec, x, weight), (x, weight)

    @jax.custom_vjp
    def mm(x, weight):
        return forward(x, weight)[0]

    def backward(residuals, grad):
        x, weight = residuals
        grad = grad.astype(dtype)
        dx = _weight_product(dx_spec, grad, weight)
        dw = jnp.einsum(dw_spec, x, grad, preferred_element_type=jnp.float32)
        return dx.astype(x_dtype), dw.astype(weight_dtype)

    mm.defvjp(forward, backward)
    return mm


def _weight_product(spec: str, x: Array, weight: Array) -> Array:
    """`einsum(spec, x, weight)` in float32 with the weight laid out `[contracted..., free...]`
    first: XLA:CPU's fast bf16 matmuls want that layout and run 2-3x slower on a transposed
    weight (a backward pass's `grad @ weight.T`, a tied embedding's logits). Transposing a
    weight costs little; the barrier keeps XLA from folding the transpose back into the matmul.
    """
    (x_spec, w_spec), out = spec.split('->')[0].split(','), spec.split('->')[1]
    order = ([c for c in w_spec if c in x_spec and c in out]  # batch
             + [c for c in w_spec if c in x_spec and c not in out]  # contracted
             + [c for c in w_spec if c not in x_spec])  # free
    if list(w_spec) != order:
        weight = jax.lax.optimization_barrier(
            jnp.transpose(weight, [w_spec.index(c) for c in order]))
        w_spec = ''.join(order)
    return jnp.einsum(f'{x_spec},{w_spec}->{out}', x, weight, preferred_element_type=jnp.float32)


# --- attention ----------------------------------------------------------------------------------
def dot_product_attention(q_bnth: Array, keys: Sequence[Array], values: Sequence[Array],
                          mask_bts: Array, matmul_dtype=None) -> Array:
    """Softmax attention with grouped-query heads (`N = K*G`).

    Keys and values come as blocks `[B, K, S_i, H]` along the key axis (one block for a
    sequence attending to itself; the KV cache's blocks when decoding), joined in one softmax:
    the cache is read in place, never concatenated. `mask_bts` covers all `S = sum(S_i)` keys.
    Both matmuls take inputs in `matmul_dtype` (default: the queries' dtype) and accumulate in
    float32; scores and softmax are float32, the probabilities are cast to `matmul_dtype` for
    the second matmul. The `G` query heads that share a key/value head are stacked along the
    query axis, and the matmuls run over `B*K` as one batch axis with the contracted dimension
    in place (XLA:CPU's fast bf16 path wants that).

    One key block (a sequence attending to itself in training, scoring and prefill) goes
    through `_self_attention`, whose backward pass runs its matmuls in `matmul_dtype` too.
    """
    b, n, t, h = q_bnth.shape
    k, g = keys[0].shape[1], n // keys[0].shape[1]
    dtype = jnp.dtype(matmul_dtype or q_bnth.dtype)
    q_bkqh = (q_bnth.reshape(b, k, g * t, h) / math.sqrt(h)).astype(dtype)  # q = g*T + t
    mask_b1qs = jnp.tile(mask_bts[:, None], (1, 1, g, 1))
    keys = [keys_bksh.astype(dtype) for keys_bksh in keys]
    values = [values_bksh.astype(dtype) for values_bksh in values]
    # Decoding one token with one query head per key/value head gives matrix-vector products,
    # which XLA:CPU runs in float32 on its slow generic path, converting the cache first; with
    # the query row doubled they stay bf16 matmuls (3x faster here).
    rows = g * t
    if rows == 1:
        q_bkqh, mask_b1qs = (jnp.concatenate([x, x], axis=2) for x in (q_bkqh, mask_b1qs))
    if len(keys) == 1:
        out_bkqh = _self_attention(q_bkqh, keys[0], values[0], mask_b1qs)
    else:
        out_bkqh = _attention(q_bkqh, keys, values, mask_b1qs)[0]
    return out_bkqh[:, :, :rows].reshape(b, n, t, h).astype(q_bnth.dtype)


def library_attention(q_bnth: Array, k_bkth: Array, v_bkth: Array, mask_bts: Array,
                      implementation: str, matmul_dtype=None) -> Array:
    """`jax.nn.dot_product_attention` over one key block, in the layout and contract of
    `dot_product_attention`: grouped-query heads, inputs in `matmul_dtype`, the output in the
    queries' dtype. `implementation` is `'xla'` or `'cudnn'` (GPUs, bfloat16 or float16 inputs),
    whose fused kernel never materialises the `[T, S]` scores."""
    dtype = jnp.dtype(matmul_dtype or q_bnth.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3).astype(dtype) for x in (q_bnth, k_bkth, v_bkth))
    out_btnh = jax.nn.dot_product_attention(q, k, v, mask=mask_bts[:, None],
                                            implementation=implementation)
    return out_btnh.transpose(0, 2, 1, 3).astype(q_bnth.dtype)


def _batched(x_bk__: Array) -> Array:
    """`[B, K, ...]` as `[B*K, ...]`: one batch axis for XLA's batched matmuls."""
    return x_bk__.reshape(-1, *x_bk__.shape[2:])


def _attention(q_bkqh: Array, keys: Sequence[Array], values: Sequence[Array],
               mask_b1qs: Array) -> tuple[Array, Array]:
    """The attention core on scaled queries and key/value blocks already in the matmul dtype:
    returns the float32 output `[B, K, Q, H]` and the probabilities `[B, K, Q, S]` in the matmul
    dtype (what the second matmul consumed)."""
    b, k, q, h = q_bkqh.shape
    scores_bkqs = jnp.concatenate([
        jnp.einsum('NQH,NSH->NQS', _batched(q_bkqh), _batched(keys_bksh),
                   preferred_element_type=jnp.float32).reshape(b, k, q, -1)
        for keys_bksh in keys], axis=-1)
    scores_bkqs = jnp.where(mask_b1qs, scores_bkqs, jnp.finfo(jnp.float32).min)
    probs_bkqs = jax.nn.softmax(scores_bkqs, axis=-1).astype(q_bkqh.dtype)
    splits = np.cumsum([keys_bksh.shape[2] for keys_bksh in keys])[:-1]
    out_bkqh = sum(jnp.einsum('NQS,NSH->NQH', _batched(p_bkqs), _batched(values_bksh),
                              preferred_element_type=jnp.float32)
                   for p_bkqs, values_bksh in zip(jnp.split(probs_bkqs, splits, axis=-1), values,
                                                  strict=True))
    return out_bkqh.reshape(b, k, q, h), probs_bkqs


@jax.custom_vjp
def _self_attention(q_bkqh: Array, k_bksh: Array, v_bksh: Array, mask_b1qs: Array) -> Array:
    """`_attention` over one key block, with a hand-written backward pass: its four matmuls
    take inputs in the matmul dtype (autodiff would feed them float32 gradients, off the fast
    bf16 path), and the residuals are the inputs and the probabilities in that dtype, rather
    than float32 scores and probabilities."""
    return _attention(q_bkqh, [k_bksh], [v_bksh], mask_b1qs)[0]


def _self_attention_forward(q_bkqh, k_bksh, v_bksh, mask_b1qs):
    out_bkqh, probs_bkqs = _attention(q_bkqh, [k_bksh], [v_bksh], mask_b1qs)
    return out_bkqh, (q_bkqh, k_bksh, v_bksh, probs_bkqs)


def _self_attention_backward(residuals, grad_bkqh):
    q_bkqh, k_bksh, v_bksh, _ = residuals
    dtype = q_bkqh.dtype
    q, k, v, p = (_batched(x) for x in residuals)
    dout = _batched(grad_bkqh.astype(dtype))
    dprobs = jnp.einsum('NQH,NSH->NQS', dout, v, preferred_element_type=jnp.float32)
    # The softmax's backward pass, p * (dp - sum(p * dp)). Masked probabilities are exactly 0
    # (every query sees at least itself), so masked scores get no gradient, as under autodiff.
    p32 = p.astype(jnp.float32)
    dscores = (p32 * (dprobs - jnp.sum(p32 * dprobs, axis=-1, keepdims=True))).astype(dtype)
    dq = jnp.einsum('NQS,NSH->NQH', dscores, k, preferred_element_type=jnp.float32)
    dk = _transposed_product(dscores, q)
    dv = _transposed_product(p, dout)
    return (dq.reshape(q_bkqh.shape).astype(dtype), dk.reshape(k_bksh.shape).astype(dtype),
            dv.reshape(v_bksh.shape).astype(dtype), None)


_self_attention.defvjp(_self_attention_forward, _self_attention_backward)


def _transposed_product(a_nqs: Array, b_nqh: Array) -> Array:
    """`einsum('NQS,NQH->NSH', a, b)` in float32. Its left operand is transposed (contracted
    axis first), which XLA:CPU's fast bf16 matmuls refuse; a transpose written out is folded
    back into the matmul, even behind a barrier. So `a` is transposed into a copy padded with
    a few rows of zeros, which cannot be folded, and the padding is sliced off the product."""
    s = a_nqs.shape[2]
    a_nsq = jnp.pad(jnp.swapaxes(a_nqs, 1, 2), ((0, 0), (0, 8), (0, 0)))
    return jnp.einsum('NSQ,NQH->NSH', a_nsq, b_nqh, preferred_element_type=jnp.float32)[:, :s]


# --- the KV cache -------------------------------------------------------------------------------
class KVCache(NamedTuple):
    """One layer's cached keys and values for decoding, in blocks `[B, K, S_i, H]` along the
    slot axis. New tokens are written into the last block at slot `index` of that block;
    earlier blocks are only read (a decoding loop carries just the block it writes).

    `previous_key` `[B, K, 1, H]` is the last written token's key before smearing (and before
    RoPE, in the compute dtype): what a smeared-key model mixes into the next token's key. Other
    models leave it None."""

    keys: Sequence[Array]
    values: Sequence[Array]
    index: Array | int
    previous_key: Array | None = None

    def write(self, k_bkth: Array, v_bkth: Array) -> KVCache:
        """The cache with `T` new keys and values written into its last block at `index`."""
        at = (0, 0, self.index, 0)
        *keys, last_keys = self.keys
        *values, last_values = self.values
        keys.append(jax.lax.dynamic_update_slice(last_keys, k_bkth.astype(last_keys.dtype), at))
        values.append(jax.lax.dynamic_update_slice(last_values, v_bkth.astype(last_values.dtype),
                                                   at))
        return KVCache(keys, values, self.index, self.previous_key)
