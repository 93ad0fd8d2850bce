"""Comparison data for reward modelling: ranked completions of the same prompt.

Three JSONL layouts, told apart by their fields (extra fields are ignored):

- pairwise `{prompt, chosen, rejected}`;
- K-way `{prompt, completions: [...], ranking: [...]}`: `ranking[i]` is the rank of
  `completions[i]`, 1 is best, equal ranks are ties (InstructGPT: all K·(K−1)/2 pairs of one
  prompt are compared with each other); an optional `gold: [...]` (the simulated labeler's gold
  scores) is kept for evaluation;
- Anthropic HH `{chosen, rejected}`: two full dialogues `"\\n\\nHuman: ...\\n\\nAssistant: ..."`;
  the prompt is their longest common prefix, cut back to the start of the last assistant turn it
  contains, and each completion is the rest of its dialogue (usually one assistant turn).

A `prompt` is a string (one user turn) or a list of `{role, content}` messages; a completion is a
string (the assistant's reply, possibly empty) or a list of messages that continues the
conversation with the assistant's turn.

Each completion is rendered with the chat template after its prompt and followed by the reserved
`<|reward|>` token: the reward model's score at that token is the reward. A group whose
completions all tie has no pair and is dropped, counted. Two layouts:

- **Branched rows** (the reward stage): a group is one sequence, its prompt once (branch 0), then
  each completion with its `<|reward|>` token as a branch of its own (`branch_ids` 1..K), whose
  positions continue the prompt's; the model's attention lets each branch see the prompt and
  itself only (`gptstack.model.attention_mask`), so each reward is the one its completion gets
  alone after the prompt. Groups are packed whole into rows of `seq_len` tokens (first fit), a
  step takes a number of rows rather than of groups, and no compute goes to padding or to the
  K-1 repeats of the prompt: about a sixth of the padded layout's tokens on the task suite.
- **Padded groups** (DPO): `[K, T]` rows, one per completion, right-padded with `<|pad|>`, with
  their own positions and segment ids (0 on padding); a group with fewer than `max_completions`
  completions gets empty slots (`valid = 0`).
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
    (padded groups) or groups (branched) cut to the row length, groups left out because every
    completion tied, and tokens."""

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


def _ranked(comparisons: Iterable[Comparison], max_completions: int,
            stats: RenderStats) -> Iterator[Comparison]:
    """The comparisons that have a pair, each checked to have at most `max_completions`
    completions; those whose completions all tie are counted in `stats` and left out."""
    for comparison in comparisons:
        k = len(comparison.completions)
        if k > max_completions:
            raise DataError(f'{comparison.where}: {k} completions, more than '
                            f'data.max_completions={max_completions}')
        if not comparison.pairs:
            stats.all_tied += 1
            continue
        yield comparison


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
    for comparison in _ranked(comparisons, max_completions, stats):
        k = len(comparison.completions)
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
    _log_render_notes(stats, 'completions', seq_len)
    return examples, stats


def _log_render_notes(stats: RenderStats, truncated: str, seq_len: int) -> None:
    notes = []
    if stats.truncated:
        notes.append(f'cut {stats.truncated} {truncated} to fit rows of {seq_len} tokens and the '
                     "model's context (from the start of the prompt)")
    if stats.all_tied:
        notes.append(f'left out {stats.all_tied} comparisons whose completions all tie (no pair '
                     'to learn from)')
    if notes:
        log.warning('comparisons: %s', '; '.join(notes))


# --- branched rows: one group per sequence, packed ---------------------------------------------
# Per-token fields of a branched group: its tokens, `branch_ids` (0 on the prompt, i + 1 on
# completion i and its reward token), `positions` (the prompt's 0..P-1, then P, P+1, ... along each
# completion), `ranks` (a completion's rank on its tokens, 0 on the prompt) and `group` (the
# group's index in the examples, plus one, on every token).
BRANCHED_FIELDS = ('tokens', 'branch_ids', 'positions', 'ranks', 'group')


def render_branched(tokenizer: Tokenizer, comparisons: Iterable[Comparison], seq_len: int,
                    max_completions: int, *, max_len: int | None = None,
                    truncate: bool = False) -> tuple[list[dict], RenderStats]:
    """Each comparison with a pair as one branched sequence (`BRANCHED_FIELDS`, each `[L]`) of
    at most `seq_len` tokens (the packed row), whose prompt and longest completion together
    take at most `max_len` positions (the model's context; `seq_len` if None).

    A group over either limit is an error naming the record, or with `truncate=True` is cut to
    fit, counted: its prompt loses tokens from its start, and if the completions alone are too
    long, the prompt goes and the longest completions lose tokens from their start, as few as
    can be, each keeping at least its end and its reward token (`_fit`).
    """
    max_len = seq_len if max_len is None else max_len
    examples, stats = [], RenderStats()
    for comparison in _ranked(comparisons, max_completions, stats):
        k = len(comparison.completions)
        prompt = render_chat(tokenizer, comparison.prompt)[0]
        branches = []
        for completion in comparison.completions:
            row = completion_row(tokenizer, comparison.prompt, completion)
            if row[:len(prompt)] != prompt:  # the chat template renders turn by turn
                raise ValueError(f'{comparison.where}: the rendered conversation does not start '
                                 'with its rendered prompt')
            branches.append(row[len(prompt):])
        length = len(prompt) + sum(map(len, branches))
        longest = len(prompt) + max(map(len, branches))
        if length > seq_len or longest > max_len:
            if length > seq_len:
                problem = (f'the prompt and its {k} completions have {length} tokens, more '
                           f'than data.seq_len={seq_len}')
            else:
                problem = (f'the prompt and its longest completion have {longest} tokens, more '
                           f"than the model's max_seq_len={max_len}")
            if not truncate:
                raise DataError(f'{comparison.where}: {problem}; shorten them or set '
                                'data.truncate=True')
            if k > seq_len:
                raise DataError(f'{comparison.where}: {problem} (a row must hold at least the '
                                'reward token of each)')
            stats.truncated += 1
            prompt, branches = _fit(prompt, branches, seq_len, max_len)
        tokens, branch_ids = [prompt], [[0] * len(prompt)]
        positions, ranks = [range(len(prompt))], [[0] * len(prompt)]
        for i, (branch, rank) in enumerate(zip(branches, comparison.ranks, strict=True)):
            tokens.append(branch)
            branch_ids.append([i + 1] * len(branch))
            positions.append(range(len(prompt), len(prompt) + len(branch)))
            ranks.append([rank] * len(branch))
        fields = [np.fromiter(itertools.chain(*x), np.int32)
                  for x in (tokens, branch_ids, positions, ranks)]
        group = np.full(len(fields[0]), len(examples) + 1, np.int32)
        examples.append(dict(zip(BRANCHED_FIELDS, [*fields, group], strict=True)))
        stats.groups += 1
        stats.completions += k
        stats.pairs += comparison.pairs
        stats.tokens += len(fields[0])
    _log_render_notes(stats, 'groups', seq_len)
    return examples, stats


def _fit(prompt: list[int], branches: list[list[int]], seq_len: int,
         max_len: int) -> tuple[list[int], list[list[int]]]:
    """The group cut to `seq_len` tokens, its prompt and longest completion to `max_len`, from
    the starts of its prompt, then of its completions: each completion keeps its last
    `min(len, cap)` tokens, with the largest `cap` that fits."""
    room = min(seq_len - sum(map(len, branches)), max_len - max(map(len, branches)))
    if room >= 0:
        return prompt[len(prompt) - room:], branches
    cap = max(c for c in range(1, min(max(map(len, branches)), max_len) + 1)
              if sum(min(len(b), c) for b in branches) <= seq_len)
    return [], [b[len(b) - min(len(b), cap):] for b in branches]


def max_groups_per_row(seq_len: int) -> int:
    """How many branched groups a row of `seq_len` tokens holds at most: a group with a pair
    has a prompt and at least two completions, each of at least one token."""
    return seq_len // 3


def _pack_branched(dataset: grain.IterDataset, seq_len: int, seed: int, shuffle: bool):
    return grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct={key: seq_len for key in BRANCHED_FIELDS}, num_packing_bins=8,
        seed=seed, shuffle_bins=shuffle, max_sequences_per_bin=max_groups_per_row(seq_len))


def to_branched_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed `[B, T]` rows -> the reward batch: `tokens`, `segment_ids` (which group of the row,
    0 on padding), `positions`, `branch_ids`, `ranks` and `group` (`BRANCHED_FIELDS`)."""
    return {'segment_ids': rows['tokens_segment_ids'],
            **{key: rows[key] for key in BRANCHED_FIELDS}}


def make_branched_dataset(examples: list[dict], seq_len: int, batch_size: int, *, seed: int,
                          process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite training stream of branched groups, reshuffled every epoch and packed into
    rows of `seq_len`: this process's rows of each global batch of `batch_size` rows."""
    dataset = grain.MapDataset.source(examples).shuffle(seed=seed).repeat().to_iter_dataset()
    return process_rows(_pack_branched(dataset, seq_len, seed, shuffle=True), batch_size,
                        process_index, process_count).map(to_branched_batch)


def make_branched_eval_batches(examples: list[dict], seq_len: int, batch_size: int, *,
                               max_batches: int, process_index: int = 0,
                               process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out groups packed in order (one pass), as this process's rows of global batches of
    `batch_size * process_count` rows, the last padded with empty rows; at most `max_batches`."""
    dataset = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(_pack_branched(dataset, seq_len, 0, shuffle=False))
    return deal_eval_rows(rows, batch_size, to_branched_batch, max_batches=max_batches,
                          process_index=process_index, process_count=process_count)


# --- padded groups (DPO) --------------------------------------------------------------------------
# Fields of an example that pass into its batch unchanged when present: DPO's reply mask
# `[K, T]` and the reference's log-probability of each completion `[K]`.
DPO_FIELDS = ('reply_mask', 'ref_logp')


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked padded groups -> the DPO batch: `tokens, segment_ids, positions` `[B, K, T]` and
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
