"""In-context copying: does a language model predict a sequence the second time it sees it?

A row holds `n` tokens drawn at random from real validation text, then the same `n` tokens
again. Nothing predicts the first copy but the token frequencies; the second copy is predictable
from the first by a model that can find the earlier occurrence of its current token and read
what followed it (an induction head, Olsson et al., 2022). The mean loss of the second copy's
tokens against the first copy's, `copy_gain = first - second` nats per token, is near 0 for a
model without that circuit and approaches the first copy's loss for one that copies exactly.

Every task that answers from its prompt (repeating a word it was told to include, sorting the
numbers it was given, writing given words in capitals) needs that circuit, so a base model whose
copy gain is near 0 will not learn those tasks in finetuning however it is trained there.

The rows are model batches of the pretraining stage's shape (`gptstack.data.pretrain`), so the
stage's compiled evaluation step scores them with no new compilation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from gptstack import losses
from gptstack.config import ConfigError
from gptstack.data import pretrain as data


def repeated_rows(pool: np.ndarray, seq_len: int, rows: int, *, seed: int,
                  bos_id: int) -> list[dict[str, np.ndarray]]:
    """`rows` packed rows of `seq_len + 1` tokens: `bos_id`, then `seq_len // 2` tokens drawn
    uniformly from `pool` (with replacement), then the same tokens again (one row per document,
    positions from 0; a row of odd `seq_len` ends with one padding token of segment 0)."""
    n = seq_len // 2
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        first = rng.choice(pool, size=n)
        tokens = np.zeros(seq_len + 1, np.int32)
        tokens[:2 * n + 1] = np.concatenate([[bos_id], first, first])
        segment_ids = np.zeros(seq_len + 1, np.int32)
        segment_ids[:2 * n + 1] = 1
        positions = np.where(segment_ids > 0, np.arange(seq_len + 1), 0).astype(np.int32)
        out.append({'tokens': tokens, 'tokens_segment_ids': segment_ids,
                    'tokens_positions': positions})
    return out


def copy_batch(rows: dict[str, np.ndarray], copy: int) -> dict[str, np.ndarray]:
    """`[B, T+1]` rows of `repeated_rows` -> the model batch whose loss mask counts the
    predictions of copy `copy` (1 or 2), its first token excepted: targets 2..n of that copy
    (the first token of the second copy would be predicted from where the row restarts, not
    from what follows a match)."""
    if copy not in (1, 2):
        raise ValueError(f'copy={copy!r}: expected 1 or 2')
    batch = data.to_model_batch(rows)
    n = (rows['tokens'].shape[1] - 1) // 2  # seq_len // 2
    # Target index i predicts token i + 1: the first copy's tokens 2..n sit at 2..n, the
    # second's at n + 2..2n, so their targets are i = 1..n-1 and n + 1..2n - 1.
    start = 1 if copy == 1 else n + 1
    window = np.zeros_like(batch['loss_mask'])
    window[:, start:start + n - 1] = 1
    batch['loss_mask'] = batch['loss_mask'] * window
    return batch


def copy_batches(pool: np.ndarray, seq_len: int, batch_size: int, *, batches: int, seed: int,
                 bos_id: int, process_index: int = 0,
                 process_count: int = 1) -> tuple[list[dict], list[dict]]:
    """This process's share of `batches` global batches of repeated rows, as two lists of the
    same rows: loss on the first copy, and on the second."""
    rows = repeated_rows(pool, seq_len, batches * batch_size * process_count, seed=seed,
                         bos_id=bos_id)
    deal = dict(max_batches=batches, process_index=process_index, process_count=process_count)
    return tuple(data.deal_eval_rows(rows, batch_size, lambda r, c=c: copy_batch(r, c), **deal)
                 for c in (1, 2))


def token_pool(sources: Sequence[data.TokenizedSource], exclude: Sequence[int]) -> np.ndarray:
    """The token ids of the sources' validation text (every occurrence, so drawing from it
    follows their frequencies), without `exclude` (special tokens)."""
    return _without(np.concatenate([data.read_tokens(s.val_path) for s in sources]), exclude)


def encoded_pool(tokenizer, documents: Sequence[str]) -> np.ndarray:
    """The token ids of `documents` under `tokenizer`, special tokens left out."""
    pool = np.concatenate([np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(documents)])
    return _without(pool, list(tokenizer.special_ids.values()))


def _without(tokens: np.ndarray, exclude: Sequence[int]) -> np.ndarray:
    return tokens[~np.isin(tokens, np.asarray(exclude, np.int32))]


def measure(policy, pool: np.ndarray, rows: int, length: int, seed: int) -> dict[str, float]:
    """`metrics` of a loaded model (`gptstack.lineage.load_policy`) on `rows` rows of `length`
    tokens from `pool`, each followed by the same `length` tokens."""
    if 2 * length > policy.config.max_seq_len:
        raise ConfigError(f'--length={length}: two copies exceed the model\'s context of '
                          f'{policy.config.max_seq_len} tokens')
    drawn = repeated_rows(pool, 2 * length, rows, seed=seed, bos_id=policy.tokenizer.eot_id)
    stacked = {k: np.stack([r[k] for r in drawn]) for k in drawn[0]}

    @jax.jit
    def loss(params, batch):
        logits = nnx.merge(policy.graphdef, params)(batch['inputs'], batch['positions'],
                                                    batch['segment_ids'])
        return losses.next_token_loss(logits, batch['targets'], batch['loss_mask'])

    sums = [tuple(float(x) for x in loss(policy.params, copy_batch(stacked, copy)))
            for copy in (1, 2)]
    return metrics(*sums)


def metrics(first: tuple[float, float], second: tuple[float, float]) -> dict[str, float]:
    """`val/copy/first`, `val/copy/second` (mean nats per token) and `val/copy_gain` from the
    `(loss_sum, count)` of each copy."""
    first_loss, second_loss = first[0] / first[1], second[0] / second[1]
    return {'val/copy/first': first_loss, 'val/copy/second': second_loss,
            'val/copy_gain': first_loss - second_loss}
