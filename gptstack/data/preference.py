"""Comparison data for reward modelling: ranked completions of the same prompt.

Three JSONL layouts, told apart by their fields (extra fields are ignored):

- pairwise `{prompt, chosen, rejected}`;
- K-way `{prompt, completions: [...], ranking: [...]}`: `ranking[i]` is the rank of
  `completions[i]`, 1 is best, equal ranks are ties (InstructGPT: all K·(K−1)/2 pairs of one
  prompt go into one batch element); an optional `gold: [...]` (the simulated labeler's gold
  scores) is kept for evaluation;
- Anthropic HH `{chosen, rejected}`: two full dialogues `"\\n\\nHuman: ...\\n\\nAssistant: ..."`;
  the prompt is their longest common prefix, cut back to the start of the last assistant turn it
  contains, and each completion is the rest of its dialogue (usually one assistant turn).

A `prompt` is a string (one user turn) or a list of `{role, content}` messages; a completion is a
string (the assistant's reply, possibly empty) or a list of messages that continues the
conversation with the assistant's turn.

Each completion is rendered with the chat template after its prompt and followed by the reserved
`<|reward|>` token: the reward model's score at that token is the reward. Rows are right-padded
with `<|pad|>` and carry their own positions and segment ids (0 on padding), so the reward does
not depend on the padding. A group with fewer than `max_completions` completions gets empty
slots (`valid = 0`); a group whose completions all tie has no pair and is dropped, counted.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence

import grain
import numpy as np

from gptstack.data.pretrain import deal_eval_rows, process_rows
from gptstack.data.sft import check_messages
from gptstack.data.sources import DataError, SkipBudget, read_json_records
from gptstack.data.tokenizer import Tokenizer, render_chat

log = logging.getLogger(__name__)

HH_TURN = re.compile(r'\n\n(Human|Assistant):')
HH_ROLES = {'Human': 'user', 'Assistant': 'assistant'}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One prompt, its completions and their ranks (lower is better, equal ranks tie)."""

    where: str
    prompt: list[dict]
    completions: list[list[dict]]
    ranks: list[int]
    # Gold scores of the completions when the record has them (simulated-labeler files): used
    # to evaluate, never to train.
    gold: list[float] | None = None

    @property
    def pairs(self) -> int:
        """Number of ordered pairs (one completion ranked strictly above another)."""
        return sum(a < b for a in self.ranks for b in self.ranks)


# --- records ------------------------------------------------------------------------------------
def comparison_from_record(record: dict, where: str) -> Comparison:
    """The validated comparison of one JSONL record in any of the three layouts.

    Raises:
        DataError: naming `where` and the offending field.
    """
    if 'completions' in record or 'ranking' in record:
        for field in ('prompt', 'completions', 'ranking'):
            if field not in record:
                raise DataError(f'{where}: a K-way record needs {field!r} (fields: '
                                f'{sorted(record)})')
        completions = record['completions']
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{where}: field 'completions' must be a list of at least 2 "
                            'completions')
        ranking = record['ranking']
        if (not isinstance(ranking, list) or len(ranking) != len(completions)
                or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking)):
            raise DataError(f"{where}: field 'ranking' must be a list of {len(completions)} "
                            'integers, the rank of each completion (1 is best, equal ranks tie)')
        if not all(1 <= r <= len(completions) for r in ranking):
            raise DataError(f"{where}: field 'ranking' {ranking}: ranks go from 1 (best) to "
                            f'{len(completions)}, the number of completions')
        gold = record.get('gold')
        if gold is not None and (not isinstance(gold, list) or len(gold) != len(completions) or
                                 not all(isinstance(g, int | float) for g in gold)):
            raise DataError(f"{where}: field 'gold' must be a list of {len(completions)} numbers")
        comparison = Comparison(where, prompt_messages(record['prompt'], where),
                                [_completion(c, where, f'completions[{i}]')
                                 for i, c in enumerate(completions)], list(ranking), gold)
        for i, j in itertools.combinations(range(len(completions)), 2):
            if comparison.completions[i] == comparison.completions[j] and ranking[i] != ranking[j]:
                raise DataError(f'{where}: completions[{i}] and completions[{j}] are identical '
                                f'but ranked {ranking[i]} and {ranking[j]}')
        return comparison
    if 'chosen' in record and 'rejected' in record:
        if 'prompt' in record:
            prompt = prompt_messages(record['prompt'], where)
            chosen, rejected = (_completion(record[f], where, f) for f in ('chosen', 'rejected'))
        else:
            prompt, chosen, rejected = split_hh_dialogues(record['chosen'], record['rejected'],
                                                          where)
        if chosen == rejected:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical, so the pair "
                            'prefers nothing')
        return Comparison(where, prompt, [chosen, rejected], [1, 2])
    raise DataError(f"{where}: expected {{prompt, chosen, rejected}}, {{prompt, completions, "
                    f"ranking}} or HH {{chosen, rejected}} (fields: {sorted(record)})")


def prompt_messages(value, where: str) -> list[dict]:
    """A prompt given as a string (one user turn) or as a list of messages, validated."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return [{'role': 'user', 'content': value}]
    return check_messages(value, where, 'prompt')


def _completion(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{'role': 'assistant', 'content': value}]
    messages = check_messages(value, where, field) if isinstance(value, list) else None
    if messages is None or messages[0]['role'] != 'assistant':
        raise DataError(f"{where}: field {field!r} must be a string or a list of messages that "
                        "starts with the assistant's turn")
    return messages


def parse_hh_dialogue(text: str, where: str, field: str) -> list[dict]:
    """The turns of an HH dialogue `"\\n\\nHuman: ...\\n\\nAssistant: ..."`."""
    if not isinstance(text, str):
        raise DataError(f'{where}: field {field!r} must be a string')
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: field {field!r} must be a dialogue of '\\n\\nHuman:' and "
                        f"'\\n\\nAssistant:' turns; it starts with {text[:40]!r}")
    return [{'role': HH_ROLES[speaker], 'content': content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def split_hh_dialogues(chosen: str, rejected: str, where: str):
    """`(prompt, chosen turns, rejected turns)` of an HH pair: the prompt is the longest common
    prefix up to the start of the last assistant turn inside it."""
    for field, value in (('chosen', chosen), ('rejected', rejected)):
        if not isinstance(value, str):
            raise DataError(f'{where}: field {field!r} must be a string')
    common = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (characters, not paths)
    # The last assistant marker inside the common part (a marker cut short by the divergence
    # does not count).
    cut = max((m.start() for m in HH_TURN.finditer(common) if m.group(1) == 'Assistant'),
              default=-1)
    if cut <= 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no dialogue before an "
                        'assistant turn, so there is no common prompt')
    return (parse_hh_dialogue(chosen[:cut], where, 'chosen'),
            parse_hh_dialogue(chosen[cut:], where, 'chosen'),
            parse_hh_dialogue(rejected[cut:], where, 'rejected'))


def read_comparisons(path: str | pathlib.Path, budget: SkipBudget) -> Iterator[Comparison]:
    """Every valid comparison of a JSONL (or `.jsonl.gz`) file; malformed records are errors or
    counted skips under `budget`."""
    for where, record in read_json_records(pathlib.Path(path), budget):
        try:
            yield comparison_from_record(record, where)
        except DataError as error:
            budget.reject(error, 'bad comparison')


def k_way_record(prompt: list[dict], completions: Sequence[str], ranks: Sequence[int],
                 **extra) -> dict:
    """The K-way JSONL record a labeler writes (a single user turn is kept as a string)."""
    if len(prompt) == 1 and prompt[0]['role'] == 'user':
        prompt = prompt[0]['content']
    return {'prompt': prompt, 'completions': list(completions),
            'ranking': [int(r) for r in ranks], **extra}


# --- the simulated labeler ----------------------------------------------------------------------
def simulated_ranking(gold: Sequence[float], noise: float, rng: np.random.Generator) -> list[int]:
    """The ranks (1 = best) a noisy labeler gives completions whose gold scores are `gold`.

    Completions of equal gold score are tied. Distinct scores are ordered by `g / noise` plus
    independent Gumbel noise, which is the Plackett-Luce model: for any two completions,
    `P(i ranked above j) = sigmoid((g_i - g_j) / noise)` (Bradley-Terry). `noise = 0` ranks
    exactly by gold.
    """
    levels, level_of = np.unique(np.asarray(gold, np.float64), return_inverse=True)
    utility = levels / noise + rng.gumbel(size=len(levels)) if noise > 0 else levels
    level_rank = np.empty(len(levels), np.int64)
    level_rank[np.argsort(-utility, kind='stable')] = np.arange(1, len(levels) + 1)
    return level_rank[level_of].tolist()


# --- rendering and batching ---------------------------------------------------------------------
@dataclasses.dataclass
class RenderStats:
    """What rendering kept: prompts (groups) and their completions, ranked pairs, completions
    cut to the row length, groups left out because every completion tied, and tokens."""

    groups: int = 0
    completions: int = 0
    pairs: int = 0
    truncated: int = 0
    all_tied: int = 0
    tokens: int = 0


def completion_row(tokenizer: Tokenizer, prompt: list[dict], completion: list[dict]) -> list[int]:
    """The token ids the reward model scores: the conversation, then `<|reward|>`."""
    return [*render_chat(tokenizer, prompt + completion)[0], tokenizer.reward_id]


def reply_mask(tokenizer: Tokenizer, prompt: list[dict], completion: list[dict]) -> list[int]:
    """1 on the tokens of `completion_row` that the completion's assistant turns wrote (their
    content and closing `<|end_of_turn|>`), 0 on the prompt, role markers and `<|reward|>`:
    the tokens whose log-probability DPO compares."""
    mask = render_chat(tokenizer, prompt + completion)[1]
    prompt_len = len(render_chat(tokenizer, prompt)[0])
    return [0] * prompt_len + mask[prompt_len:] + [0]


def render_comparisons(tokenizer: Tokenizer, comparisons: Iterable[Comparison], seq_len: int,
                       max_completions: int, *, truncate: bool = False,
                       with_reply_mask: bool = False) -> tuple[list[dict], RenderStats]:
    """Each comparison as `{tokens [K, T], lengths [K], ranks [K], valid [K]}` with
    `K = max_completions` and `T = seq_len`, and `reply_mask [K, T]` (`reply_mask`) if asked.

    A completion row is the rendered conversation plus `<|reward|>`. A row longer than `seq_len`
    is an error naming the record, or with `truncate=True` loses tokens from the start of the
    prompt (the completion and the reward token are kept), counted.
    """
    examples, stats = [], RenderStats()
    for comparison in comparisons:
        k = len(comparison.completions)
        if k > max_completions:
            raise DataError(f'{comparison.where}: {k} completions, more than '
                            f'data.max_completions={max_completions}')
        if not comparison.pairs:
            stats.all_tied += 1
            continue
        tokens = np.full((max_completions, seq_len), tokenizer.pad_id, np.int32)
        lengths = np.zeros(max_completions, np.int32)
        masks = np.zeros((max_completions, seq_len), np.int32)
        for i, completion in enumerate(comparison.completions):
            ids = completion_row(tokenizer, comparison.prompt, completion)
            mask = reply_mask(tokenizer, comparison.prompt, completion) if with_reply_mask \
                else []
            if len(ids) > seq_len:
                if not truncate:
                    raise DataError(f'{comparison.where}: completion {i} with its prompt has '
                                    f'{len(ids)} tokens, more than data.seq_len={seq_len}; '
                                    'shorten it or set data.truncate=True')
                ids, mask = ids[-seq_len:], mask[-seq_len:]
                stats.truncated += 1
            tokens[i, :len(ids)] = ids
            masks[i, :len(mask)] = mask
            lengths[i] = len(ids)
            stats.tokens += len(ids)
        ranks = np.zeros(max_completions, np.int32)
        ranks[:k] = comparison.ranks
        examples.append({'tokens': tokens, 'lengths': lengths, 'ranks': ranks,
                         'valid': (np.arange(max_completions) < k).astype(np.int32)})
        if with_reply_mask:
            examples[-1]['reply_mask'] = masks
        stats.groups += 1
        stats.completions += k
        stats.pairs += comparison.pairs
    notes = []
    if stats.truncated:
        notes.append(f'truncated {stats.truncated} completions to {seq_len} tokens (from the '
                     'start of the prompt)')
    if stats.all_tied:
        notes.append(f'left out {stats.all_tied} comparisons whose completions all tie (no pair '
                     'to learn from)')
    if notes:
        log.warning('comparisons: %s', '; '.join(notes))
    return examples, stats


# Fields of an example that pass into its batch unchanged when present: DPO's reply mask
# `[K, T]` and the reference's log-probability of each completion `[K]`.
DPO_FIELDS = ('reply_mask', 'ref_logp')


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked examples -> the reward batch: `tokens, segment_ids, positions` `[B, K, T]` and
    `ranks, valid` `[B, K]` (and DPO's fields, when the examples have them)."""
    tokens = rows['tokens']
    positions = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int32), tokens.shape)
    segment_ids = (positions < rows['lengths'][..., None]).astype(np.int32)
    return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions,
            'ranks': rows['ranks'], 'valid': rows['valid'],
            **{key: rows[key] for key in DPO_FIELDS if key in rows}}


def make_preference_dataset(examples: list[dict], batch_size: int, *, seed: int,
                            process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite training stream of comparisons, reshuffled every epoch: this process's
    rows of each global batch (`gptstack.data.pretrain.process_rows`)."""
    dataset = grain.MapDataset.source(examples).shuffle(seed=seed).repeat().to_iter_dataset()
    return process_rows(dataset, batch_size, process_index, process_count).map(to_model_batch)


def make_preference_eval_batches(examples: list[dict], batch_size: int, *, max_batches: int,
                                 process_index: int = 0,
                                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out comparisons in order as global batches of `batch_size * process_count` groups,
    the last padded with empty groups (`valid = 0`): this process's slice of each, as in
    training, so the global batches (and their order) do not depend on how many processes
    share the run."""
    global_batches = deal_eval_rows(examples, batch_size * process_count, to_model_batch,
                                    max_batches=max_batches, process_index=0, process_count=1)
    mine = slice(process_index * batch_size, (process_index + 1) * batch_size)
    return [{k: v[mine] for k, v in batch.items()} for batch in global_batches]
