"""The GPT model: one decoder-only transformer in two architecture families.

Notable features:
- `family='gpt'` (GPT-2/GPT-3): learned absolute positions, LayerNorm, GELU(tanh) MLP, optional
  biases, tied input/output embeddings. `family='llama'`: rotary position embeddings, RMSNorm,
  SwiGLU MLP, grouped-query attention (`n_kv_head < n_head`), untied output head.
- Pre-norm residual blocks; residual output projections initialised with std/sqrt(2*n_layer)
  (GPT-2 paper, section 2.3).
- Attention is causal and can be kept inside documents of a packed row with `segment_ids`; RoPE
  and learned positions read per-token `positions`, which restart at every document. With
  `branch_ids` a document is a shared prefix (branch 0) followed by continuations of it (branches
  1, 2, ...) that each see the prefix and themselves only: K replies to one prompt scored in one
  row, each exactly as if it followed the prompt alone.
- Optional smeared keys (`smeared_keys`, Olsson et al., 2022): a head's key at position t is a
  learned mix of the keys at t and t-1 (within a document), which lets a single layer match "the
  token after an earlier copy of this one", the induction head behind in-context copying.
- Layers are stacked along a leading `layers` axis (`nnx.vmap`) and run with `jax.lax.scan`
  (`scan_layers`, compile time independent of depth) or unrolled over slices of the stack (no
  stacked buffers of saved activations); generation always unrolls them.
- Matmuls and attention come from `gptstack.ops`: inputs in `matmul_dtype`, float32 accumulation.
- No dropout: the forward pass needs no RNG. Logits and softmax are computed in float32.
- `GPT` returns next-token logits; `ScoreModel` swaps the LM head for `ScoreHead` (one scalar per
  position) and serves as the reward and value model.
- Every parameter carries logical axis names (see `gptstack.sharding`); the modules are used
  functionally through `nnx.split` / `nnx.merge` at the jit boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gptstack.config import GPTConfig
from gptstack.ops import KVCache, dot_product_attention, library_attention, matmul
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


def apply_rope(x_bnth: Array, positions_bt: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021) in the split-halves layout, heads first."""
    half = x_bnth.shape[-1] // 2
    inv_freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq_h
    sin, cos = jnp.sin(angle_bth)[:, None], jnp.cos(angle_bth)[:, None]
    x1, x2 = jnp.split(x_bnth.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_bnth.dtype)


def smear_keys(k_bkth: Array, positions_bt: Array, smear_k: Array,
               previous_bk1h: Array | None = None,
               predecessors_bt: Array | None = None) -> Array:
    """Smeared keys: `k'_t = w * k_t + (1 - w) * k_{t-1}` with `w = sigmoid(smear)` per key head.

    At a document's first token (position 0) `k_{t-1}` is `k_t` itself, so nothing leaks across
    the documents of a packed row or from a prompt's left padding. `previous_bk1h` is the key
    before the first of these tokens (decoding from a cache); without it the first token's own.
    `predecessors_bt` (`branch_predecessors`) names each token's predecessor in the row when it is
    not the token before it, as for the first token of a branch.
    """
    if predecessors_bt is not None:
        before_bkth = jnp.take_along_axis(k_bkth, predecessors_bt[:, None, :, None], axis=2)
    else:
        first_bk1h = (k_bkth[:, :, :1] if previous_bk1h is None else
                      previous_bk1h.astype(k_bkth.dtype))
        before_bkth = jnp.concatenate([first_bk1h, k_bkth[:, :, :-1]], axis=2)
    before_bkth = jnp.where((positions_bt == 0)[:, None, :, None], k_bkth, before_bkth)
    w_k = jax.nn.sigmoid(smear_k.astype(jnp.float32)).astype(k_bkth.dtype)[None, :, None, None]
    return w_k * k_bkth + (1 - w_k) * before_bkth


def attention_mask(segment_ids_bt: Array, branch_ids_bt: Array | None = None) -> Array:
    """`[B, T, S]` boolean mask: causal, and only within the same segment (document); with
    `branch_ids_bt`, a token of branch `i > 0` sees only branch 0 (the shared prefix) and branch
    `i` of its segment."""
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask_bts = causal_ts[None] & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    if branch_ids_bt is not None:
        mask_bts &= ((branch_ids_bt[:, :, None] == branch_ids_bt[:, None, :]) |
                     (branch_ids_bt[:, None, :] == 0))
    return mask_bts


def branch_predecessors(branch_ids_bt: Array) -> Array:
    """`[B, T]` index of the token each token follows in a row of branches: the one before it,
    except that the first token of a branch `i > 0` follows the last token of the shared prefix
    (branch 0) before it. Segments are contiguous, each prefix before its branches."""
    t_bt = jnp.broadcast_to(jnp.arange(branch_ids_bt.shape[1]), branch_ids_bt.shape)
    prefix_end_bt = jax.lax.cummax(jnp.where(branch_ids_bt == 0, t_bt, 0), axis=1)
    previous_branch_bt = jnp.pad(branch_ids_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts_branch_bt = (branch_ids_bt > 0) & (branch_ids_bt != previous_branch_bt)
    return jnp.where(starts_branch_bt, prefix_end_bt, jnp.maximum(t_bt - 1, 0))


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
        if config.qkv_bias:
            self.q_bias_nh = _zeros((n, h), ('heads', 'head_dim'), dtype)
            self.k_bias_kh = _zeros((k, h), ('kv_heads', 'head_dim'), dtype)
            self.v_bias_kh = _zeros((k, h), ('kv_heads', 'head_dim'), dtype)
        if config.use_bias:
            self.o_bias_d = _zeros((d,), ('embed',), dtype)
        if config.smeared_keys:
            # Logits of each key head's own-key weight; 0 starts at an even mix.
            self.key_smear_k = _zeros((k,), ('kv_heads',), dtype)

    def __call__(self, x_btd: Array, positions_bt: Array, mask: Array,
                 cache: KVCache | None = None, predecessors_bt: Array | None = None):
        """Attention of `T` tokens among themselves (`mask` `[B, T, T]`) or, when decoding, over a
        `cache` into which their keys and values are written first (`mask` `[B, T, C]` over the
        cache's `C` slots, theirs included). `predecessors_bt`: see `smear_keys`.

        Returns:
            `(y_btd, kv)`: the output and either these tokens' keys and values and, with
            smeared keys, the last one's key before smearing (None otherwise)
            `(k_bkth, v_bkth, previous_bk1h)` (the start of a cache), or the updated `cache`.
        """
        c = self.config
        dtype = x_btd.dtype
        # Projections as plain (B*T, D) x (D, N*H) matmuls, then heads moved before positions
        # (a free transpose when decoding one token): asking the matmul for heads-first output
        # makes XLA transpose the weights instead, at every decoding step.
        mm = c.matmul_dtype
        q = matmul('BTD,DNH->BTNH', x_btd, self.q_weight_dnh[...], mm).transpose(0, 2, 1, 3)
        k = matmul('BTD,DKH->BTKH', x_btd, self.k_weight_dkh[...], mm).transpose(0, 2, 1, 3)
        v = matmul('BTD,DKH->BTKH', x_btd, self.v_weight_dkh[...], mm).transpose(0, 2, 1, 3)
        if c.qkv_bias:
            q = q + self.q_bias_nh[...].astype(dtype)[:, None]
            k = k + self.k_bias_kh[...].astype(dtype)[:, None]
            v = v + self.v_bias_kh[...].astype(dtype)[:, None]
        last_key_bk1h = None  # what the next token's key mixes in (smeared keys only)
        if c.smeared_keys:
            if cache is not None and cache.previous_key is None:
                raise ValueError("smeared keys: decoding needs the cache's previous_key, the "
                                 "last written token's key before smearing")
            last_key_bk1h = k[:, :, -1:]
            k = smear_keys(k, positions_bt, self.key_smear_k[...],
                           None if cache is None else cache.previous_key, predecessors_bt)
        if c.family == 'llama':
            q = apply_rope(q, positions_bt, c.rope_theta)
            k = apply_rope(k, positions_bt, c.rope_theta)
        q = constrain(q, ('batch', 'heads', 'seq', 'head_dim'))
        k = constrain(k, ('batch', 'kv_heads', 'seq', 'head_dim'))
        v = constrain(v, ('batch', 'kv_heads', 'seq', 'head_dim'))
        # Keys and values in the matmul dtype: what attention reads, and so what a cache holds.
        k, v = k.astype(mm), v.astype(mm)
        if cache is None:
            kv = (k, v, last_key_bk1h)
            if c.attention == 'gptstack':
                out_bnth = dot_product_attention(q, [k], [v], mask, mm)
            else:
                out_bnth = library_attention(q, k, v, mask, c.attention, mm)
        else:
            kv = cache.write(k, v)._replace(previous_key=last_key_bk1h)
            out_bnth = dot_product_attention(q, kv.keys, kv.values, mask, mm)
        out_btnh = out_bnth.transpose(0, 2, 1, 3)
        y_btd = matmul('BTNH,NHD->BTD', out_btnh, self.o_weight_nhd[...], mm)
        if c.use_bias:
            y_btd = y_btd + self.o_bias_d[...].astype(dtype)
        return y_btd, kv


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
        h_btf = matmul('BTD,DF->BTF', x_btd, self.up_weight_df[...], c.matmul_dtype)
        if c.use_bias:
            h_btf = h_btf + self.up_bias_f[...].astype(dtype)
        if c.family == 'llama':
            gate_btf = matmul('BTD,DF->BTF', x_btd, self.gate_weight_df[...], c.matmul_dtype)
            h_btf = jax.nn.silu(gate_btf) * h_btf
        else:
            h_btf = jax.nn.gelu(h_btf, approximate=True)
        h_btf = constrain(h_btf, ('batch', 'seq', 'mlp'))
        y_btd = matmul('BTF,FD->BTD', h_btf, self.down_weight_fd[...], c.matmul_dtype)
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

    def __call__(self, x_btd: Array, positions_bt: Array, mask: Array,
                 cache: KVCache | None = None, predecessors_bt: Array | None = None):
        """Returns `(x_btd, kv)`; see `Attention.__call__` for the mask, the cache and the
        predecessors."""
        attn_btd, kv = self.attn(self.attn_norm(x_btd), positions_bt, mask, cache,
                                 predecessors_bt)
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
                 segment_ids_bt: Array | None = None,
                 branch_ids_bt: Array | None = None) -> Array:
        """Returns the final hidden states `[B, T, D]` in the compute dtype."""
        return self.prefill(tokens_bt, positions_bt, segment_ids_bt,
                            branch_ids_bt=branch_ids_bt)[0]

    def prefill(self, tokens_bt: Array, positions_bt: Array | None = None,
                segment_ids_bt: Array | None = None, blocks: Sequence[Block] | None = None,
                branch_ids_bt: Array | None = None):
        """Hidden states and every layer's keys, values and last key before smearing
        `(k_lbkth, v_lbkth, previous_lbk1h)` (the start of a KV cache; XLA drops them when only
        the hidden states are used).

        `blocks` (`unstacked_blocks()`, as generation uses) unrolls the layers over those; by
        default the stacked blocks run as `config.scan_layers` says. `branch_ids_bt`: a shared
        prefix and its continuations (`attention_mask`), whose positions continue the prefix's;
        its rows are for scoring, not for starting a cache."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        x_btd = self.embed(tokens_bt, positions_bt)
        mask_btt = attention_mask(segment_ids_bt, branch_ids_bt)
        predecessors_bt = (None if branch_ids_bt is None or not self.config.smeared_keys else
                           branch_predecessors(branch_ids_bt))
        block_graphdef, block_params = nnx.split(self.blocks)

        def layer(x_btd, params):
            return nnx.merge(block_graphdef, params)(x_btd, positions_bt, mask_btt,
                                                     predecessors_bt=predecessors_bt)

        if self.config.remat:
            layer = jax.checkpoint(layer, prevent_cse=False)
        if blocks is None and self.config.scan_layers:
            x_btd, kv = jax.lax.scan(layer, x_btd, block_params)
        else:
            per_layer = ([nnx.state(block) for block in blocks] if blocks is not None else
                         [jax.tree.map(lambda p, i=i: p[i], block_params)
                          for i in range(self.config.n_layer)])
            kvs = []
            for params in per_layer:
                x_btd, kv_i = layer(x_btd, params)
                kvs.append(kv_i)
            kv = jax.tree.map(lambda *layers: jnp.stack(layers), *kvs)
        return self.final_norm(x_btd), kv

    def unstacked_blocks(self) -> list[Block]:
        """The stacked blocks as one `Block` per layer, with the matmul weights (`*_weight_*`)
        cast once to `matmul_dtype`, as every matmul would cast them.

        Generation (prefill and decoding) unrolls its layers over these, sliced once per call: a
        `scan` would slice every layer's weights and KV cache again at every token.
        """
        graphdef, state = nnx.split(self.blocks)
        matmul_dtype = self.config.matmul_dtype

        def layer_slice(path, x, i):
            x = x[i]
            return x.astype(matmul_dtype) if '_weight_' in str(path[-1]) else x

        layers = [jax.tree.map_with_path(lambda path, x, i=i: layer_slice(path, x, i), state)
                  for i in range(self.config.n_layer)]
        # The barrier makes these real arrays, here: otherwise XLA sinks the slicing into a
        # loop that uses them and copies every weight again at each iteration.
        return [nnx.merge(graphdef, state) for state in jax.lax.optimization_barrier(layers)]

    def decode(self, tokens_bt: Array, positions_bt: Array, blocks: Sequence[Block],
               caches: Sequence[KVCache], mask_btc: Array):
        """`(h_btd, updated caches)` for `T` new tokens whose keys and values are written into
        every layer's cache and which attend to the slots where `mask_btc` (`[B, T, C]` over the
        `C` slots of the cache blocks passed) is true, their own included.

        `blocks` are `unstacked_blocks()`; `caches` holds one `KVCache` per layer, of which only
        the blocks passed are read, so a caller passes those that hold tokens so far.
        """
        x_btd = self.embed(tokens_bt, positions_bt)
        updated = []
        for block, cache in zip(blocks, caches, strict=True):
            x_btd, cache = block(x_btd, positions_bt, mask_btc, cache)
            updated.append(cache)
        return self.final_norm(x_btd), updated

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
                 segment_ids_bt: Array | None = None,
                 branch_ids_bt: Array | None = None) -> Array:
        return self.logits(self.transformer(tokens_bt, positions_bt, segment_ids_bt,
                                            branch_ids_bt))

    def prefill(self, tokens_bt: Array, positions_bt: Array, segment_ids_bt: Array,
                blocks: Sequence[Block] | None = None):
        """`(logits [B, V], (k_lbkth, v_lbkth, previous_lbk1h))`: the logits after a
        (left-padded) prompt, i.e. at its last position only, and the prompt's KV cache; see
        `Transformer.prefill`."""
        h_btd, kv = self.transformer.prefill(tokens_bt, positions_bt, segment_ids_bt, blocks)
        return self.logits(h_btd[:, -1:])[:, 0], kv

    def decode(self, tokens_bt: Array, positions_bt: Array, blocks: Sequence[Block],
               caches: Sequence[KVCache], mask_btc: Array):
        """`(logits [B, T, V], updated caches)` of new tokens over a KV cache (generation); see
        `Transformer.decode`."""
        h_btd, caches = self.transformer.decode(tokens_bt, positions_bt, blocks, caches,
                                                mask_btc)
        return self.logits(h_btd), caches

    def logits(self, h_btd: Array) -> Array:
        mm = self.config.matmul_dtype
        if self.config.tie_embeddings:
            logits_btv = matmul('BTD,VD->BTV', h_btd, self.transformer.token_embed_vd[...], mm,
                                jnp.float32)
        else:
            logits_btv = matmul('BTD,DV->BTV', h_btd, self.lm_head_dv[...], mm, jnp.float32)
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
                 segment_ids_bt: Array | None = None,
                 branch_ids_bt: Array | None = None) -> Array:
        return self.score_head(self.transformer(tokens_bt, positions_bt, segment_ids_bt,
                                                branch_ids_bt))


def read_at_token(scores_bt: Array, tokens_bt: Array, token_id: int) -> Array:
    """`[B]`: each row's score at its first `token_id` (the reward token), NaN in a row that has
    none.

    The read position is found from the tokens themselves, never from lengths or padding, so
    padding on either side and anything after the token (which causal attention cannot see)
    leave the value unchanged. A missing token gives NaN rather than a plausible number.
    """
    is_token_bt = tokens_bt == token_id
    index_b = jnp.argmax(is_token_bt, axis=1)
    value_b = jnp.take_along_axis(scores_bt, index_b[:, None], axis=1)[:, 0]
    return jnp.where(is_token_bt.any(axis=1), value_b, jnp.nan)


def count_params(params) -> int:
    """Total number of parameters in a (possibly abstract) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
