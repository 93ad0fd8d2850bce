"""Supervised finetuning data: conversations rendered with the chat template, packed into rows.

- Records are JSONL lines with `messages: [{role, content}, ...]` (system/user/assistant,
  multi-turn; a system turn only first; the last turn is the assistant's) or
  `{prompt, response}` (one user turn and one assistant turn). Every malformed record is a
  `DataError` naming `file:line` and the field, or a counted skip under the skip budget.
- A conversation longer than a row (`seq_len + 1` tokens) is an error, or, with
  `truncate=True`, cut to the row and counted (a conversation left with no assistant token is
  skipped through the budget).
- Conversations are packed whole (first fit, never split across rows); segment ids keep them
  from attending to each other and positions restart in each. The model batch's `loss_mask` is 1
  exactly where the target is an assistant token (content or its `<|end_of_turn|>`) of the
  same conversation.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Iterable, Iterator

import grain
import numpy as np

from gptstack.data.pretrain import deal_eval_rows, process_rows
from gptstack.data.sources import DataError, SkipBudget, read_json_records
from gptstack.data.tokenizer import ROLES, Tokenizer, render_chat

log = logging.getLogger(__name__)


def check_messages(messages, where: str, field: str = 'messages') -> list[dict]:
    """`messages` as a list of `{role, content}` turns, or a `DataError` naming the turn: every
    role is known, every content a non-empty string, and a system turn comes only first."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: field {field!r} must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {'role', 'content'} <= set(message):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(message['role'], str) or message['role'] not in ROLES:
            raise DataError(f"{where}: {field}[{i}].role {message['role']!r}: expected one of "
                            f'{sorted(ROLES)}')
        if not isinstance(message['content'], str) or not message['content'].strip():
            raise DataError(f'{where}: {field}[{i}].content must be a non-empty string')
        if message['role'] == 'system' and i:
            raise DataError(f'{where}: {field}[{i}]: a system turn may only come first')
    return [{'role': m['role'], 'content': m['content']} for m in messages]


def conversation_from_record(record: dict, where: str, prompt_field: str = 'prompt',
                             response_field: str = 'response') -> list[dict]:
    """The validated `messages` of one record (either layout; the prompt/response field names
    are configurable, e.g. GSM8K's `question`/`answer`).

    Raises:
        DataError: naming `where` and the offending field.
    """
    if 'messages' in record:
        messages = check_messages(record['messages'], where)
        if messages[-1]['role'] != 'assistant':
            raise DataError(f"{where}: the conversation ends with a {messages[-1]['role']!r} "
                            'turn; it must end with an assistant turn')
        return messages
    if prompt_field in record or response_field in record:
        for field in (prompt_field, response_field):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise DataError(f'{where}: field {field!r} must be a non-empty string')
        return [{'role': 'user', 'content': record[prompt_field]},
                {'role': 'assistant', 'content': record[response_field]}]
    raise DataError(f"{where}: expected 'messages' or {prompt_field!r} and {response_field!r} "
                    f'(fields: {sorted(record)})')


def read_conversations(path: str | pathlib.Path, budget: SkipBudget, *,
                       prompt_field: str = 'prompt',
                       response_field: str = 'response') -> Iterator[tuple[str, list]]:
    """`(location, messages)` for every valid record of a JSONL file."""
    for where, record in read_json_records(pathlib.Path(path), budget):
        try:
            yield where, conversation_from_record(record, where, prompt_field, response_field)
        except DataError as error:
            budget.reject(error, 'bad conversation')


@dataclasses.dataclass
class RenderStats:
    """What rendering kept: conversations, how many were cut to the row length, and their
    tokens (all, and the assistant's, which the loss counts)."""

    conversations: int = 0
    truncated: int = 0
    tokens: int = 0
    assistant_tokens: int = 0


def render_examples(tokenizer: Tokenizer, conversations: Iterable[tuple[str, list]],
                    seq_len: int, *, truncate: bool = False,
                    budget: SkipBudget | None = None) -> tuple[list[dict], RenderStats]:
    """Token ids and assistant masks of conversations, each at most `seq_len + 1` tokens."""
    budget = budget or SkipBudget()
    examples, stats = [], RenderStats()
    limit = seq_len + 1
    for where, messages in conversations:
        ids, mask = render_chat(tokenizer, messages)
        if len(ids) > limit:
            if not truncate:
                raise DataError(f'{where}: the conversation has {len(ids)} tokens, more than a '
                                f'row of {limit} (data.seq_len + 1); shorten it or set '
                                'data.truncate=True')
            ids, mask = ids[:limit], mask[:limit]
            stats.truncated += 1
            if not any(mask[1:]):
                budget.reject(DataError(f'{where}: no assistant token is left after truncating '
                                        f'to {limit} tokens'), 'truncated away')
                continue
        examples.append({'tokens': np.asarray(ids, np.int32), 'mask': np.asarray(mask, np.int32)})
        stats.conversations += 1
        stats.tokens += len(ids)
        stats.assistant_tokens += int(sum(mask))
    if stats.truncated:
        log.warning('truncated %d of %d conversations to %d tokens', stats.truncated,
                    stats.conversations, limit)
    return examples, stats


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed `[B, T+1]` rows -> the `[B, T]` model batch; loss only on assistant targets."""
    tokens, segment_ids = rows['tokens'], rows['tokens_segment_ids']
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids[:, :-1],
                positions=rows['tokens_positions'][:, :-1],
                loss_mask=(same & (rows['mask'][:, 1:] == 1)).astype(np.int32))


def _pack(dataset: grain.IterDataset, seq_len: int, seed: int, shuffle: bool):
    return grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct={'tokens': seq_len + 1, 'mask': seq_len + 1},
        num_packing_bins=8, seed=seed, shuffle_bins=shuffle)


def make_sft_dataset(examples: list[dict], seq_len: int, batch_size: int, *, seed: int,
                     process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite, shuffled (each epoch), packed training stream of this process's rows of
    each global batch (`gptstack.data.pretrain.process_rows`)."""
    dataset = grain.MapDataset.source(examples)
    dataset = dataset.shuffle(seed=seed).repeat().to_iter_dataset()
    return process_rows(_pack(dataset, seq_len, seed, shuffle=True), batch_size, process_index,
                        process_count).map(to_model_batch)


def pack_in_order(examples: list[dict], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Packed `[T+1]` rows of `examples` in their order (no shuffling, one pass)."""
    dataset = grain.MapDataset.source(examples).to_iter_dataset()
    return list(_pack(dataset, seq_len, 0, shuffle=False))


def make_sft_eval_batches(examples: list[dict], seq_len: int, batch_size: int, *,
                          max_batches: int, process_index: int = 0,
                          process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Validation conversations packed in order, padded so every process gets the same number
    of batches (padding rows have loss mask 0)."""
    return deal_eval_rows(pack_in_order(examples, seq_len), batch_size, to_model_batch,
                          max_batches=max_batches, process_index=process_index,
                          process_count=process_count)
