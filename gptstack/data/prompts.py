"""RL prompts: the embedded task prompts or JSONL `{prompt}` / `{messages}` records (or another
field named by the config, such as GSM8K's `question`) with an optional answer, rendered up to
the assistant's turn and served as a shuffled stream.

A prompt knows how to score a reply when that is verifiable: the task's gold scorer, exact match
(after stripping whitespace) with the record's answer, or the number the reply gives against the
answer's number (`gptstack.data.answers`; for GSM8K, the number after `####` of the worked
solution).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import grain
import numpy as np

from gptstack.data import answers, tasks
from gptstack.data.preference import prompt_messages
from gptstack.data.sources import DataError, SkipBudget, read_json_records
from gptstack.data.tokenizer import Tokenizer, render_prompt

log = logging.getLogger(__name__)


# How a reply is checked against a record's answer: its whole text, or a number read from it.
MATCHES = ('text', *answers.RULES)
# How a record's answer field is read: as it is, or as a GSM8K worked solution ending in `#### N`.
ANSWER_FORMATS = ('text', 'gsm8k')


@dataclasses.dataclass(frozen=True)
class Prompt:
    messages: list
    task: tasks.Task | None = None
    answer: str | None = None
    # `MATCHES`: 'text' (exact match) or the rule reading the reply's number.
    match: str = 'text'

    def gold(self, reply: str) -> float | None:
        """The verifiable score of a reply, or None when there is no way to check it."""
        if self.task is not None:
            return tasks.score(self.task, reply)
        if self.answer is None:
            return None
        if self.match == 'text':
            return float(reply.strip() == self.answer.strip())
        return float(answers.reply_number(reply, self.match) == answers.normalise_number(
            self.answer))

    def formatted(self, reply: str) -> bool:
        """Whether the reply states a final answer in the form its number is read from (a
        number; after `####` for `marked_number`), right or wrong: what a format reward pays."""
        if self.match not in answers.RULES:
            raise ValueError(f'a format reward needs a number match, not {self.match!r}')
        return answers.reply_number(reply, self.match) is not None


def task_prompts(split: str, n: int, seed: int) -> list[Prompt]:
    return [Prompt(t.messages(with_answer=False), task=t) for t in tasks.generate(split, n, seed)]


def read_prompts(path: str | pathlib.Path, budget: SkipBudget, *, prompt_field: str = 'prompt',
                 answer_field: str = 'answer', answer_format: str = 'text',
                 match: str = 'text') -> list[Prompt]:
    """Every valid record of a JSONL file: `messages`, or `prompt_field` (a string or
    messages) as the prompt, which must end with a user turn, and `answer_field` if present.
    With `answer_format='gsm8k'` the answer is a worked solution, and its number after `####`
    is kept (a record without one is refused, naming its line); `match` says how replies are
    checked against it (`Prompt.match`)."""
    if answer_format not in ANSWER_FORMATS or match not in MATCHES:
        raise ValueError(f'answer_format={answer_format!r}, match={match!r}: expected one of '
                         f'{ANSWER_FORMATS} and {MATCHES}')
    prompts = []
    for where, record in read_json_records(pathlib.Path(path), budget):
        try:
            field = 'messages' if 'messages' in record else prompt_field
            if field not in record:
                raise DataError(f"{where}: expected {prompt_field!r} or 'messages' (fields: "
                                f'{sorted(record)})')
            messages = prompt_messages(record[field], where)
            if messages[-1]['role'] != 'user':
                raise DataError(f'{where}: the prompt must end with a user turn')
            answer = record.get(answer_field)
            if answer is not None and not isinstance(answer, str):
                raise DataError(f'{where}: field {answer_field!r} must be a string')
            if answer is not None and answer_format == 'gsm8k':
                answer = answers.final_answer(answer, where)
        except DataError as error:
            budget.reject(error, 'bad prompt')
            continue
        prompts.append(Prompt(messages, answer=answer, match=match))
    return prompts


def prompt_dataset(prompts: list[Prompt], tokenizer: Tokenizer, max_len: int, batch_size: int,
                   seed: int) -> grain.IterDataset:
    """The shuffled (every epoch), repeating stream of batches `{tokens [B, max_len], lengths
    [B], index [B]}`: rendered prompts right-padded with `<|pad|>`, and their index in `prompts`.
    A longer prompt keeps its last `max_len` tokens (counted in the log)."""
    rows, cut = [], 0
    for index, prompt in enumerate(prompts):
        ids = render_prompt(tokenizer, prompt.messages)
        cut += len(ids) > max_len
        ids = ids[-max_len:]
        tokens = np.full(max_len, tokenizer.pad_id, np.int32)
        tokens[:len(ids)] = ids
        rows.append({'tokens': tokens, 'lengths': np.int32(len(ids)), 'index': np.int32(index)})
    if cut:
        log.warning('%d of %d prompts are longer than %d tokens: keeping their ends', cut,
                    len(rows), max_len)
    return (grain.MapDataset.source(rows).shuffle(seed=seed).repeat().to_iter_dataset()
            .batch(batch_size, drop_remainder=True))


class ZipIterator(grain.DatasetIterator):
    """`{name: next(iterator)}` from several grain iterators, checkpointed together (PPO's
    prompts and its PPO-ptx pretraining rows resume as one)."""

    def __init__(self, **iterators: grain.DatasetIterator):
        super().__init__()
        self.iterators = iterators

    def __next__(self) -> dict:
        return {name: next(it) for name, it in self.iterators.items()}

    def get_state(self) -> dict:
        return {name: it.get_state() for name, it in self.iterators.items()}

    def set_state(self, state: dict) -> None:
        for name, it in self.iterators.items():
            it.set_state(state[name])
