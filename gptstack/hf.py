"""Hugging Face checkpoints in and out: a local `save_pretrained` directory (safetensors) of
GPT-2 or of the LLaMA architecture becomes a `GPTConfig` and parameters laid out on a mesh, and
parameters trained here become such a directory again.

Supported (`config.json`'s `architectures`):

| architecture | family | notes |
|---|---|---|
| `GPT2LMHeadModel` | `gpt` | fused `c_attn`, Conv1D weights stored `[in, out]`, tied head |
| `LlamaForCausalLM` | `llama` | separate q/k/v, grouped-query attention, tied or untied head |
| `Qwen2ForCausalLM` | `llama` | the LLaMA layout with biases on q/k/v (`GPTConfig.qkv_bias`) |

Anything the model does not implement (rope scaling, sliding windows, another activation, a
head_dim other than hidden_size / heads, biases on other layers) is refused with a one-line
`ConfigError` naming the field; a model is never loaded approximately. Every tensor's name and
shape is checked against `config.json` before anything is read, and a tensor of the checkpoint
that nothing reads is an error as well.

`config.json` is mapped by `gptstack.hf_config`. Loading reads one stacked parameter at a time
from the memory-mapped files and hands each device only its shard
(`jax.make_array_from_callback`), so no host holds the whole model. With the directory's
tokenizer, the embedding gains a row for each reserved special token that the tokenizer lacked
(`gptstack.data.hf_tokenizer`): the mean of the rows of the tokenizer's own vocabulary.

The mapping, ours <- theirs (`L` layers stacked on our leading axis):

    token_embed_vd            wte.weight | model.embed_tokens.weight                 [V, D]
    pos_embed_td (gpt)        wpe.weight                                               [T, D]
    attn.q/k/v_weight         c_attn.weight [D, 3D] split in three | q/k/v_proj.weight [NH, D]^T
    attn.o_weight_nhd         c_proj.weight [D, D] | o_proj.weight [D, NH]^T
    mlp.up/down_weight        c_fc / c_proj.weight [in, out] | up/down_proj.weight [out, in]^T
    mlp.gate_weight_df        gate_proj.weight [F, D]^T
    norms                     ln_1 / ln_2 / ln_f | input_layernorm / post_attention_layernorm / norm
    lm_head_dv (untied)       lm_head.weight [V, D]^T
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import ml_dtypes  # bfloat16 for NumPy: safetensors reads it once this is imported
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptstack import sharding
from gptstack.config import GPTConfig
from gptstack.data.sources import DataError
from gptstack.hf_config import CONFIG_FILE, gpt_config, hf_config, read_config
from gptstack.model import GPT
from gptstack.state import abstract_model

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Buffers that older checkpoints store and that hold no parameters (GPT-2's causal mask, LLaMA's
# rotary frequencies): recomputed here, so skipped.
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')


# --- the tensor mapping -------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One tensor of the Hugging Face checkpoint and the parameters of ours it holds.

    `ours` are paths under `transformer.blocks` (per layer: `hf` has a `{i}`) or from the model's
    root; `to_ours(tensor) -> arrays` (one per path) and `to_hf(*arrays) -> tensor` convert
    between the two layouts of one layer."""
    hf: str
    shape: tuple[int, ...]
    ours: tuple[tuple[str, ...], ...]
    to_ours: Callable
    to_hf: Callable

    @property
    def per_layer(self) -> bool:
        return '{i}' in self.hf


def _same(*paths: tuple[str, ...], hf: str, shape) -> Link:
    return Link(hf, tuple(shape), paths, lambda x: (x,), lambda x: x)


def _block(*names: str) -> tuple[str, ...]:
    return ('transformer', 'blocks', *names)


def links(config: GPTConfig, prefix: str = '') -> list[Link]:
    """Every tensor of `config`'s Hugging Face checkpoint; `prefix` is prepended to GPT-2's
    names (`'transformer.'` in checkpoints written by `GPT2LMHeadModel.save_pretrained`)."""
    c = config
    d, n, k, h, f, v = c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.vocab_size
    if c.family == 'gpt':
        p = prefix + 'h.{i}.'

        def split_qkv(x):  # [D, 3D] or [3D]: q | k | v, each heads-major
            q, kk, vv = np.split(x, 3, axis=-1)
            lead = x.shape[:-1]
            return (q.reshape(*lead, n, h), kk.reshape(*lead, n, h), vv.reshape(*lead, n, h))

        def join_qkv(*parts):
            return np.concatenate([x.reshape(*x.shape[:-2], n * h) for x in parts], axis=-1)

        out = [
            _same(_block('attn_norm', 'scale'), hf=p + 'ln_1.weight', shape=(d,)),
            _same(_block('attn_norm', 'bias'), hf=p + 'ln_1.bias', shape=(d,)),
            Link(p + 'attn.c_attn.weight', (d, 3 * d),
                 tuple(_block('attn', name) for name in ('q_weight_dnh', 'k_weight_dkh',
                                                       'v_weight_dkh')), split_qkv, join_qkv),
            Link(p + 'attn.c_attn.bias', (3 * d,),
                 tuple(_block('attn', name) for name in ('q_bias_nh', 'k_bias_kh', 'v_bias_kh')),
                 split_qkv, join_qkv),
            Link(p + 'attn.c_proj.weight', (d, d), (_block('attn', 'o_weight_nhd'),),
                 lambda x: (x.reshape(n, h, d),), lambda x: x.reshape(n * h, d)),
            _same(_block('attn', 'o_bias_d'), hf=p + 'attn.c_proj.bias', shape=(d,)),
            _same(_block('mlp_norm', 'scale'), hf=p + 'ln_2.weight', shape=(d,)),
            _same(_block('mlp_norm', 'bias'), hf=p + 'ln_2.bias', shape=(d,)),
            _same(_block('mlp', 'up_weight_df'), hf=p + 'mlp.c_fc.weight', shape=(d, f)),
            _same(_block('mlp', 'up_bias_f'), hf=p + 'mlp.c_fc.bias', shape=(f,)),
            _same(_block('mlp', 'down_weight_fd'), hf=p + 'mlp.c_proj.weight', shape=(f, d)),
            _same(_block('mlp', 'down_bias_d'), hf=p + 'mlp.c_proj.bias', shape=(d,)),
            _same(('transformer', 'token_embed_vd'), hf=prefix + 'wte.weight', shape=(v, d)),
            _same(('transformer', 'pos_embed_td'), hf=prefix + 'wpe.weight',
                  shape=(c.max_seq_len, d)),
            _same(('transformer', 'final_norm', 'scale'), hf=prefix + 'ln_f.weight', shape=(d,)),
            _same(('transformer', 'final_norm', 'bias'), hf=prefix + 'ln_f.bias', shape=(d,)),
        ]
    else:
        p = 'model.layers.{i}.'

        def linear(path, name, n_out, ours_shape):
            """A torch Linear `[n_out, n_in]` (y = x W^T) for our `[n_in, ...]` weight."""
            return Link(p + name, (n_out, math.prod(ours_shape) // n_out), (_block(*path),),
                        lambda x: (x.T.reshape(ours_shape),),
                        lambda x: x.reshape(-1, n_out).T)

        def output(path, name, ours_shape):
            """A torch Linear `[D, n_in]` for our `[..., D]` weight whose inputs lead."""
            return Link(p + name, (d, math.prod(ours_shape) // d), (_block(*path),),
                        lambda x: (x.T.reshape(ours_shape),),
                        lambda x: x.reshape(-1, d).T)

        out = [
            _same(_block('attn_norm', 'scale'), hf=p + 'input_layernorm.weight', shape=(d,)),
            linear(('attn', 'q_weight_dnh'), 'self_attn.q_proj.weight', n * h, (d, n, h)),
            linear(('attn', 'k_weight_dkh'), 'self_attn.k_proj.weight', k * h, (d, k, h)),
            linear(('attn', 'v_weight_dkh'), 'self_attn.v_proj.weight', k * h, (d, k, h)),
            output(('attn', 'o_weight_nhd'), 'self_attn.o_proj.weight', (n, h, d)),
            _same(_block('mlp_norm', 'scale'), hf=p + 'post_attention_layernorm.weight',
                  shape=(d,)),
            linear(('mlp', 'gate_weight_df'), 'mlp.gate_proj.weight', f, (d, f)),
            linear(('mlp', 'up_weight_df'), 'mlp.up_proj.weight', f, (d, f)),
            output(('mlp', 'down_weight_fd'), 'mlp.down_proj.weight', (f, d)),
            _same(('transformer', 'token_embed_vd'), hf='model.embed_tokens.weight',
                  shape=(v, d)),
            _same(('transformer', 'final_norm', 'scale'), hf='model.norm.weight', shape=(d,)),
        ]
        if c.qkv_bias:
            for name, heads in (('q', n), ('k', k), ('v', k)):
                path = _block('attn', f'{name}_bias_{"n" if name == "q" else "k"}h')
                out.append(Link(p + f'self_attn.{name}_proj.bias', (heads * h,), (path,),
                                lambda x, heads=heads: (x.reshape(heads, h),),
                                lambda x: x.reshape(-1)))
    if not c.tie_embeddings:
        out.append(Link('lm_head.weight', (v, d), (('lm_head_dv',),), lambda x: (x.T,),
                        lambda x: x.T))
    return out


# --- reading ------------------------------------------------------------------------------------
class Checkpoint:
    """The tensors of a `save_pretrained` directory: `model.safetensors`, or the shards that
    `model.safetensors.index.json` names. Opening checks that every file exists and has a
    readable header; tensors are read lazily (the files are memory-mapped).

    Raises:
        DataError: a missing or unreadable file, named.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / WEIGHTS_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())['weight_map']
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(f'{index}: not a safetensors index ({error})') from None
        elif single.exists():
            weight_map = None
        else:
            raise DataError(f'{self.directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (only '
                            'safetensors checkpoints are read)')
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_FILE]
        self._handles, self.where = {}, {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise DataError(f'{path}: missing; {INDEX_FILE} names it for '
                                f'{sum(f == name for f in weight_map.values())} tensors')
            try:
                handle = safe_open(str(path), framework='numpy')
            except SafetensorError as error:
                raise DataError(f'{path}: not a readable safetensors file, truncated or '
                                f'corrupt ({error})') from None
            self._handles[name] = handle
            self.where.update(dict.fromkeys(handle.keys(), name))
        if weight_map:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise DataError(f'{self.directory / name}: holds no tensor {key}, which '
                                    f'{INDEX_FILE} places there')

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, dtype) -> np.ndarray:
        path = self.directory / self.where[name]
        try:
            return np.asarray(self._handles[self.where[name]].get_tensor(name)).astype(dtype)
        except SafetensorError as error:
            raise DataError(f'{path}: tensor {name} cannot be read, the file is truncated or '
                            f'corrupt ({error})') from None


def _layer_names(link: Link, n_layer: int) -> Iterator[str]:
    return (link.hf.format(i=i) for i in range(n_layer)) if link.per_layer else iter([link.hf])


def _gpt2_prefix(checkpoint: Checkpoint) -> str:
    return 'transformer.' if 'transformer.wte.weight' in checkpoint.where else ''


def check(checkpoint: Checkpoint, config: GPTConfig) -> list[Link]:
    """The links of `config`, after checking that the checkpoint holds each tensor in the shape
    `config.json` implies and nothing else (buffers aside).

    Raises:
        DataError: a missing tensor, a tensor of another shape, or one that nothing reads.
    """
    prefix = _gpt2_prefix(checkpoint) if config.family == 'gpt' else ''
    expected = links(config, prefix)
    wanted = set()
    for link in expected:
        for name in _layer_names(link, config.n_layer):
            wanted.add(name)
            if name not in checkpoint.where:
                raise DataError(f'{checkpoint.directory}: no tensor {name} (config.json '
                                f'describes {config.n_layer} layers of this architecture)')
            if checkpoint.shape(name) != link.shape:
                raise DataError(f'{checkpoint.directory / checkpoint.where[name]}: tensor {name} '
                                f'has shape {list(checkpoint.shape(name))}, config.json implies '
                                f'{list(link.shape)}')
    unread = sorted(name for name in checkpoint.where
                    if name not in wanted and not name.endswith(_BUFFERS))
    if unread:
        raise DataError(f'{checkpoint.directory / checkpoint.where[unread[0]]}: tensor '
                        f'{unread[0]} ({len(unread)} in all) has no place in the model '
                        'config.json describes')
    return expected


def check_tokenizer(directory: pathlib.Path, config: GPTConfig, tokenizer) -> None:
    """Refuses a `tokenizer.json` with ids that the embedding has no row for (the embedding may
    have more rows than the tokenizer has ids: padding)."""
    if tokenizer.base_vocab_size > config.vocab_size:
        raise DataError(f'{directory / "tokenizer.json"}: {tokenizer.base_vocab_size} tokens, but '
                        f'{CONFIG_FILE} gives the embedding vocab_size={config.vocab_size} rows')


def _grow_vocabulary(host: np.ndarray, axis: int, tokenizer, vocab_size: int) -> np.ndarray:
    """The embedding (or untied head) `host`, `vocab_size` long on `axis`, with the rows of the
    tokenizer's added ids set to the mean of the rows of its own vocabulary."""
    host = np.moveaxis(host, axis, 0)
    grown = np.zeros((vocab_size, *host.shape[1:]), host.dtype)
    grown[:len(host)] = host
    grown[tokenizer.added_ids] = host[:tokenizer.base_vocab_size].astype(np.float32).mean(0)
    return np.moveaxis(grown, 0, axis)


def load_hf(directory: str | os.PathLike, mesh: Mesh, rules: str, tokenizer=None, **overrides):
    """`(config, graphdef, params)` of the `GPT` in a Hugging Face model directory, the params
    laid out over `mesh` by `rules` in `overrides.get('param_dtype', 'float32')`. With the
    directory's `tokenizer` (an `HFTokenizer`), the embedding gains a row for each special
    token that the tokenizer added (`_grow_vocabulary`).

    Raises:
        ConfigError: an architecture or a `config.json` field that the model does not implement.
        DataError: a missing or truncated file, a missing, misshapen or unexpected tensor, or a
            tokenizer with more ids than the embedding has rows.
    """
    directory = pathlib.Path(directory)
    config = gpt_config(read_config(directory), str(directory / CONFIG_FILE), **overrides)
    checkpoint = Checkpoint(directory)
    expected = check(checkpoint, config)
    if tokenizer is not None:
        check_tokenizer(directory, config, tokenizer)
        embeddings = {('transformer', 'token_embed_vd'): 0, ('lm_head_dv',): 1}
        vocab_size = max(config.vocab_size, tokenizer.vocab_size)
        config = dataclasses.replace(config, vocab_size=vocab_size)
    graphdef, abstract = abstract_model(lambda rngs: GPT(config, rngs=rngs))
    shardings = {path: v.get_value() for path, v in
                 nnx.to_flat_state(sharding.param_shardings(abstract, mesh, rules))}
    dtype = np.dtype(config.param_dtype if config.param_dtype != 'bfloat16'
                     else ml_dtypes.bfloat16)
    values = {}
    for link in expected:
        per_layer = [link.to_ours(checkpoint.read(name, dtype))
                     for name in _layer_names(link, config.n_layer)]
        for j, path in enumerate(link.ours):
            host = np.stack([parts[j] for parts in per_layer]) if link.per_layer \
                else per_layer[0][j]
            if tokenizer is not None and path in embeddings:
                host = _grow_vocabulary(host, embeddings[path], tokenizer, vocab_size)
            values[path] = jax.make_array_from_callback(host.shape, shardings[path],
                                                        lambda index, host=host: host[index])
    flat = nnx.to_flat_state(abstract)
    missing = [path for path, _ in flat if path not in values]
    if missing:  # a mapping that forgets a parameter is a bug here, not in the checkpoint
        raise AssertionError(f'no Hugging Face tensor fills {missing}')
    params = nnx.from_flat_state([(path, v.replace(values[path])) for path, v in flat])
    return config, graphdef, params


# --- writing ------------------------------------------------------------------------------------
def save_hf(directory: str | os.PathLike, config: GPTConfig, params: nnx.State,
            **tokens) -> pathlib.Path:
    """Writes `config.json` and `model.safetensors` that transformers' `from_pretrained` reads
    as the same model; `tokens` go into the config (`bos_token_id`, `eos_token_id`, ...). Every
    process must call it (the parameters are gathered); process 0 writes.

    The parameters of a `ScoreModel` (a reward model) are written as the architecture's
    `...ForSequenceClassification` with one label, `reward`: the score head's weight is
    `score.weight` `[1, D]`, and its bias, which that class does not have, the extra tensor
    `score.bias` `[1]`. Transformers leaves the extra tensor unread, so its scores are ours
    less that constant (rankings are the same); it reads the score at the last token that is
    not `pad_token_id`, which is the reward token when a reply ends with it, as ours do.
    """
    directory = pathlib.Path(directory)
    hf = hf_config(config, **tokens)
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(params)}
    tensors = {}
    is_score = ('score_head', 'weight_d') in flat
    if is_score:
        hf['architectures'] = [hf['architectures'][0].replace('LMHeadModel', 'ForCausalLM')
                               .replace('ForCausalLM', 'ForSequenceClassification')]
        hf.update(id2label={'0': 'reward'}, label2id={'reward': 0})
        tensors['score.weight'] = np.asarray(sharding.to_host(flat['score_head', 'weight_d']))[None]
        tensors['score.bias'] = np.asarray(sharding.to_host(flat['score_head', 'bias'])).reshape(1)
    for link in links(config, prefix='transformer.' if config.family == 'gpt' else ''):
        if is_score and link.ours == (('lm_head_dv',),):
            continue
        host = [np.asarray(sharding.to_host(flat[path])) for path in link.ours]
        if link.per_layer:
            for i in range(config.n_layer):
                tensors[link.hf.format(i=i)] = np.ascontiguousarray(
                    link.to_hf(*(x[i] for x in host)))
        else:
            tensors[link.hf] = np.ascontiguousarray(link.to_hf(*host))
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={'format': 'pt'})
        (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + '\n')
    sharding.barrier('save_hf')
    return directory
