"""The GPT model: one decoder-only transformer in two architecture families.

Notable features:
- `family='gpt'` (GPT-2/GPT-3): learned absolute positions, LayerNorm, GELU(tanh) MLP, optional
  biases, tied input/output embeddings. `family='llama'`: rotary position embeddings, RMSNorm,
  SwiGLU MLP, grouped-query attention (`n_kv_head < n_head`), untied output head.
- Pre-norm residual blocks; residual output projections initialised with std/sqrt(2*n_layer)
  (GPT-2 paper, section 2.3).
- Attention is causal and can be kept inside documents of a packed row with `segment_ids`; RoPE
  and learned positions read per-token `positions`, which restart at every document.
- Layers are stacked along a leading `layers` axis (`nnx.vmap`) and run with `jax.lax.scan`, so
  compile time does not grow with depth.
- No dropout: the forward pass needs no RNG. Logits and softmax are computed in float32.
- `GPT` returns next-token logits; `ScoreModel` swaps the LM head for `ScoreHead` (one scalar per
  position) and serves as the reward and value model.
- Every parameter carries logical axis names (see `gptstack.sharding`); the modules are used
  functionally through `nnx.split` / `nnx.merge` at the jit boundary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptstack.config import GPTConfig
from gptstack.sharding import constrain

Array = jax.Array


def _param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, out_sharding=names)


def _zeros(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names)


def _ones(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=names)


# --- building blocks ----------------------------------------------------------------------------
class LayerNorm(nnx.Module):
    def __init__(self, config: GPTConfig):
        dtype = config.param_dtype
        self.eps = config.norm_eps
        self.scale = _ones((config.d_model,), ('embed',), dtype)
        self.bias = _zeros((config.d_model,), ('embed',), dtype) if config.use_bias else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, config: GPTConfig):
        self.eps = config.norm_eps
        self.scale = _ones((config.d_model,), ('embed',), config.param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def make_norm(config: GPTConfig) -> LayerNorm | RMSNorm:
    return RMSNorm(config) if config.family == 'llama' else LayerNorm(config)


def apply_rope(x_btnh: Array, positions_bt: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021) in the split-halves layout."""
    half = x_btnh.shape[-1] // 2
    inv_freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq_h
    sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_btnh.dtype)


def attention_mask(segment_ids_bt: Array) -> Array:
    """`[B, T, S]` boolean mask: causal, and only within the same segment (document)."""
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal_ts[None] & same_segment_bts


def dot_product_attention(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_bts: Array) -> Array:
    """Softmax attention with grouped-query heads (`N = K*G`); scores and softmax in float32."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores_bkgts = jnp.einsum('BTKGH,BSKH->BKGTS', q_btkgh, k_bskh,
                              preferred_element_type=jnp.float32) / math.sqrt(h)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts,
                             jnp.finfo(jnp.float32).min)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum('BKGTS,BSKH->BTKGH', probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, n, k, h = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        std, dtype = config.init_std, config.param_dtype
        out_std = std / math.sqrt(2 * config.n_layer)
        self.q_weight_dnh = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), std, dtype)
        self.k_weight_dkh = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, dtype)
        self.v_weight_dkh = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), std, dtype)
        self.o_weight_nhd = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), out_std, dtype)
        if config.use_bias:
            self.q_bias_nh = _zeros((n, h), ('heads', 'head_dim'), dtype)
            self.k_bias_kh = _zeros((k, h), ('kv_heads', 'head_dim'), dtype)
            self.v_bias_kh = _zeros((k, h), ('kv_heads', 'head_dim'), dtype)
            self.o_bias_d = _zeros((d,), ('embed',), dtype)

    def __call__(self, x_btd: Array, positions_bt: Array, mask_bts: Array,
                 kv_cache: tuple[Array, Array] | None = None,
                 cache_index: Array | int = 0) -> tuple[Array, tuple[Array, Array]]:
        """Attention of the `T` new tokens over `S` keys.

        Without `kv_cache` the keys are the new tokens themselves (`S = T`, training). With
        `kv_cache = (k_bskh, v_bskh)` the new keys/values are written at `cache_index` and the
        queries attend over the whole cache (`S` = cache length, generation); `mask_bts` says
        which cache slots each query may see.

        Returns:
            `(y_btd, (k_bskh, v_bskh))`: the output and the keys/values attended over (the
            updated cache when one was given).
        """
        c = self.config
        dtype = x_btd.dtype
        q = jnp.einsum('BTD,DNH->BTNH', x_btd, self.q_weight_dnh[...].astype(dtype))
        k = jnp.einsum('BSD,DKH->BSKH', x_btd, self.k_weight_dkh[...].astype(dtype))
        v = jnp.einsum('BSD,DKH->BSKH', x_btd, self.v_weight_dkh[...].astype(dtype))
        if c.use_bias:
            q, k, v = (q + self.q_bias_nh[...].astype(dtype), k + self.k_bias_kh[...].astype(dtype),
                       v + self.v_bias_kh[...].astype(dtype))
        if c.family == 'llama':
            q = apply_rope(q, positions_bt, c.rope_theta)
            k = apply_rope(k, positions_bt, c.rope_theta)
        if kv_cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv_cache[0], k.astype(kv_cache[0].dtype),
                                                    cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv_cache[1], v.astype(kv_cache[1].dtype),
                                                    cache_index, axis=1)
        q = constrain(q, ('batch', 'seq', 'heads', 'head_dim'))
        k = constrain(k, ('batch', 'seq', 'kv_heads', 'head_dim'))
        v = constrain(v, ('batch', 'seq', 'kv_heads', 'head_dim'))
        out_btnh = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask_bts)
        y_btd = jnp.einsum('BTNH,NHD->BTD', out_btnh, self.o_weight_nhd[...].astype(dtype))
        if c.use_bias:
            y_btd = y_btd + self.o_bias_d[...].astype(dtype)
        return y_btd, (k, v)


class MLP(nnx.Module):
    """GELU MLP (gpt) or SwiGLU (llama): D -> F -> D."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f, std, dtype = config.d_model, config.d_ff, config.init_std, config.param_dtype
        out_std = std / math.sqrt(2 * config.n_layer)
        self.up_weight_df = _param(rngs, (d, f), ('embed', 'mlp'), std, dtype)
        if config.family == 'llama':
            self.gate_weight_df = _param(rngs, (d, f), ('embed', 'mlp'), std, dtype)
        self.down_weight_fd = _param(rngs, (f, d), ('mlp', 'embed'), out_std, dtype)
        if config.use_bias:
            self.up_bias_f = _zeros((f,), ('mlp',), dtype)
            self.down_bias_d = _zeros((d,), ('embed',), dtype)

    def __call__(self, x_btd: Array) -> Array:
        c, dtype = self.config, x_btd.dtype
        h_btf = jnp.einsum('BTD,DF->BTF', x_btd, self.up_weight_df[...].astype(dtype))
        if c.use_bias:
            h_btf = h_btf + self.up_bias_f[...].astype(dtype)
        if c.family == 'llama':
            gate_btf = jnp.einsum('BTD,DF->BTF', x_btd, self.gate_weight_df[...].astype(dtype))
            h_btf = jax.nn.silu(gate_btf) * h_btf
        else:
            h_btf = jax.nn.gelu(h_btf, approximate=True)
        h_btf = constrain(h_btf, ('batch', 'seq', 'mlp'))
        y_btd = jnp.einsum('BTF,FD->BTD', h_btf, self.down_weight_fd[...].astype(dtype))
        if c.use_bias:
            y_btd = y_btd + self.down_bias_d[...].astype(dtype)
        return y_btd


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_btd: Array, positions_bt: Array, mask_bts: Array,
                 kv_cache: tuple[Array, Array] | None = None, cache_index: Array | int = 0):
        """Returns `(x_btd, (k, v))`; see `Attention.__call__` for the cache."""
        attn_btd, kv = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, kv_cache,
                                 cache_index)
        x_btd = x_btd + attn_btd
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return constrain(x_btd, ('batch', 'seq', 'embed')), kv


# --- the transformer and its heads --------------------------------------------------------------
class Transformer(nnx.Module):
    """Token (and, for gpt, position) embedding, the stacked blocks and the final norm."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, std, dtype = config.d_model, config.init_std, config.param_dtype
        self.token_embed_vd = _param(rngs, (config.vocab_size, d), ('vocab', 'embed'), std, dtype)
        if config.family == 'gpt':
            self.pos_embed_td = _param(rngs, (config.max_seq_len, d), (None, 'embed'), std, dtype)

        @nnx.split_rngs(splits=config.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = make_norm(config)

    def __call__(self, tokens_bt: Array, positions_bt: Array | None = None,
                 segment_ids_bt: Array | None = None) -> Array:
        """Returns the final hidden states `[B, T, D]` in the compute dtype."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        x_btd = self.embed(tokens_bt, positions_bt)
        mask_bts = attention_mask(segment_ids_bt)
        block_graphdef, block_params = nnx.split(self.blocks)

        def layer(x_btd, params):
            x_btd, _ = nnx.merge(block_graphdef, params)(x_btd, positions_bt, mask_bts)
            return x_btd, None

        if self.config.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)
        x_btd, _ = jax.lax.scan(layer, x_btd, block_params)
        return self.final_norm(x_btd)

    def decode(self, tokens_bt: Array, positions_bt: Array, mask_bts: Array,
               cache: tuple[Array, Array], cache_index: Array | int):
        """Hidden states of `T` new tokens attending over a KV cache.

        Args:
            cache: `(k_lbskh, v_lbskh)`, one slice per layer; the new keys/values are written at
                `cache_index` along `S`.
            mask_bts: which of the `S` cache slots each new token may attend to.

        Returns:
            `(h_btd, updated cache)`.
        """
        x_btd = self.embed(tokens_bt, positions_bt)
        block_graphdef, block_params = nnx.split(self.blocks)

        def layer(x_btd, params_and_cache):
            params, k_bskh, v_bskh = params_and_cache
            return nnx.merge(block_graphdef, params)(x_btd, positions_bt, mask_bts,
                                                     (k_bskh, v_bskh), cache_index)

        x_btd, cache = jax.lax.scan(layer, x_btd, (block_params, *cache))
        return self.final_norm(x_btd), cache

    def embed(self, tokens_bt: Array, positions_bt: Array) -> Array:
        c = self.config
        # Gather from a whole table: a table split on both dims makes XLA rematerialise it anyway.
        table_vd = constrain(self.token_embed_vd[...], (None, None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(c.dtype)
        if c.family == 'gpt':
            x_btd = x_btd + jnp.take(self.pos_embed_td[...], positions_bt, axis=0).astype(c.dtype)
        return constrain(x_btd, ('batch', 'seq', 'embed'))


class GPT(nnx.Module):
    """Language model: `tokens [B, T] -> next-token logits [B, T, V]` (float32)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = Transformer(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head_dv = _param(rngs, (config.d_model, config.vocab_size),
                                     ('embed', 'vocab'), config.init_std, config.param_dtype)

    def __call__(self, tokens_bt: Array, positions_bt: Array | None = None,
                 segment_ids_bt: Array | None = None) -> Array:
        return self.logits(self.transformer(tokens_bt, positions_bt, segment_ids_bt))

    def decode(self, tokens_bt: Array, positions_bt: Array, mask_bts: Array,
               cache: tuple[Array, Array], cache_index: Array | int):
        """`(logits [B, T, V], updated cache)` of new tokens over a KV cache (generation)."""
        h_btd, cache = self.transformer.decode(tokens_bt, positions_bt, mask_bts, cache,
                                               cache_index)
        return self.logits(h_btd), cache

    def init_cache(self, batch_size: int, length: int) -> tuple[Array, Array]:
        """Zeroed `(k, v)` caches of shape `[L, B, S, K, H]` in the compute dtype."""
        c = self.config
        shape = (c.n_layer, batch_size, length, c.n_kv_head, c.head_dim)
        return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

    def logits(self, h_btd: Array) -> Array:
        if self.config.tie_embeddings:
            table_vd = self.transformer.token_embed_vd[...].astype(h_btd.dtype)
            logits_btv = jnp.einsum('BTD,VD->BTV', h_btd, table_vd,
                                    preferred_element_type=jnp.float32)
        else:
            logits_btv = jnp.einsum('BTD,DV->BTV', h_btd, self.lm_head_dv[...].astype(h_btd.dtype),
                                    preferred_element_type=jnp.float32)
        return constrain(logits_btv, ('batch', 'seq', 'vocab'))


class ScoreHead(nnx.Module):
    """One scalar per position: `[B, T, D] -> [B, T]` (reward and value models)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.weight_d = _param(rngs, (config.d_model,), ('embed',), config.init_std,
                               config.param_dtype)
        self.bias = _zeros((), (), config.param_dtype)

    def __call__(self, h_btd: Array) -> Array:
        scores_bt = jnp.einsum('BTD,D->BT', h_btd, self.weight_d[...].astype(h_btd.dtype),
                               preferred_element_type=jnp.float32)
        return scores_bt + self.bias[...].astype(jnp.float32)


class ScoreModel(nnx.Module):
    """The GPT backbone with a score head: `tokens [B, T] -> scores [B, T]` (float32).

    Its `transformer` subtree has the same structure as `GPT.transformer`, so a reward or value
    model starts from a language model's weights by copying that subtree.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = Transformer(config, rngs=rngs)
        self.score_head = ScoreHead(config, rngs=rngs)

    def __call__(self, tokens_bt: Array, positions_bt: Array | None = None,
                 segment_ids_bt: Array | None = None) -> Array:
        return self.score_head(self.transformer(tokens_bt, positions_bt, segment_ids_bt))


def count_params(params) -> int:
    """Total number of parameters in a (possibly abstract) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
