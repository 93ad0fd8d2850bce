"""Generated bad input: every mutation of a valid record, and every corruption of a JSONL line,
is read or refused with a `DataError` naming where, never another exception
(`python -m pytest -q tests/test_fuzz.py`). 550 cases, drawn the same way on every run
(`derandomize`), so a failure in CI is one anybody can reproduce."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptstack.data import preference, prompts, sft
from gptstack.data.sources import DataError, SkipBudget, read_json_records

# One valid record of every layout the readers take.
VALID = [
    {'prompt': 'Name a colour.', 'chosen': 'Blue.', 'rejected': 'Seven.'},
    {'prompt': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}],
     'completions': ['Hello.', 'Go away.', 'Hi!'], 'ranking': [1, 3, 2], 'gold': [1, 0, 0.5]},
    {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello.', 'rejected': '\n\nHuman: Hi\n\nAssistant: No.'},
    {'prompt': 'What is 2 + 2?', 'response': '4'},
    {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]},
    {'prompt': 'What is 2 + 2?', 'answer': '4'},
]
READERS = [preference.comparison_from_record, sft.conversation_from_record]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) |
    st.text(max_size=12) | st.sampled_from(['user', 'assistant', 'system', 'robot', '']),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(['role', 'content', 'prompt', 'x']) | st.text(max_size=6), inner,
        max_size=3),
    max_leaves=8)


def paths(value, prefix=()):
    """Every place in a JSON value that a mutation can reach."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


@st.composite
def mutated(draw):
    record = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        places = [p for p in paths(record) if p]
        if not places:  # everything was deleted
            record[draw(st.text(max_size=8))] = draw(JSON)
            continue
        path = draw(st.sampled_from(places))
        *parent_path, last = path
        parent = record
        for key in parent_path:
            parent = parent[key]
        action = draw(st.sampled_from(['replace', 'delete', 'add']))
        if action == 'replace':
            parent[last] = draw(JSON)
        elif action == 'delete':
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return record


def read_or_refuse(record) -> None:
    for reader in READERS:
        try:
            reader(record, 'f.jsonl:1')
        except DataError as error:
            assert str(error).startswith('f.jsonl:1'), error


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_records_are_read_or_refused_naming_the_line(record):
    read_or_refuse(record)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(record=st.sampled_from(VALID), cut=st.integers(0, 200), noise=st.binary(max_size=6),
       at=st.integers(0, 200))
def test_corrupted_jsonl_lines_are_counted_skips_or_data_errors(tmp_path_factory, record, cut,
                                                                noise, at):
    line = json.dumps(record).encode()
    line = line[:cut] if cut < len(line) else line
    line = line[:at] + noise + line[at:]
    path = tmp_path_factory.mktemp('fuzz') / 'data.jsonl'
    content = line + b'\n' + json.dumps(VALID[3]).encode() + b'\n'
    path.write_bytes(content)
    lines = content.split(b'\n')[:-1]  # the noise may hold line breaks of its own
    budget = SkipBudget(len(lines))
    rows = list(read_json_records(path, budget))
    assert rows[-1] == (f'{path}:{len(lines)}', VALID[3])  # the good line is always read
    # Every line that is not blank is read or counted as a skip: nothing vanishes.
    assert len(rows) + sum(budget.by_reason.values()) == sum(1 for x in lines if x.strip())
    for reader in (preference.read_comparisons, sft.read_conversations, prompts.read_prompts):
        try:
            list(reader(path, SkipBudget(len(lines))))
        except DataError as error:  # only when the budget is spent: never here
            pytest.fail(f'{reader.__name__}: {error}')
