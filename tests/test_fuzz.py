"""Generated bad input: every mutation of a valid record, and every corruption of a JSONL line,
is read or refused with a `DataError` naming where; every command-line override of every stage's
config is parsed and checked or refused in one line; never another exception
(`python -m pytest -q tests/test_fuzz.py`). 1,150 cases, drawn the same way on every run
(`derandomize`), so a failure in CI is one anybody can reproduce."""

import copy
import functools
import importlib
import json
import math

import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from experiments import dpo, pipeline
from gptstack.config import KEY_BOUNDS, ConfigError
from gptstack.data import preference, prompts, sft
from gptstack.data.sources import DataError, SkipBudget, read_json_records
from tests.runs import ROOT

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


# --- config overrides ----------------------------------------------------------------------
# The stage configs as the command line gives them (the pipeline holds every stage but DPO), the
# overrides that make them complete, and their validation: what `experiments.run` does before
# any work.
# `experiments.run.RECIPE` (importing `experiments.run` would define its command-line flags in
# this process, where other tests' entry points define theirs).
RECIPE = {name: importlib.import_module(f'experiments.{name}')
          for name in ('tokenizer', 'pretrain', 'sft', 'reward', 'rl', 'dpo')}
CONFIGS = {
    'pipeline.py:quick': ((), lambda c: pipeline.validate(c, RECIPE)),
    'pipeline.py': ((), lambda c: pipeline.validate(c, RECIPE)),
    'dpo.py': (('--config.data.train=comparisons.jsonl',), dpo.validate),
}


# ml_collections loads config files with importlib's deprecated `load_module`.
OLD_LOADER = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')


def parse(name, *args):
    """The config as `experiments.run` parses its command line `--config=<name> *args`."""
    argv = ['run', f'--config={ROOT / "experiments" / "configs" / name}', *args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True,
                                             sys_argv=argv)
    flag_values(argv)
    return holder.value


# Numeric blocks whose ranges a dataclass checks (`GPTConfig`, `MeshConfig`, `OptimConfig`,
# `LoopConfig`, `PPOConfig`, `DPOLoss`) or the mixture reader (source weights).
CHECKED_BY_DATACLASSES = ('model.', 'mesh.', 'optim.', 'critic_optim.', 'train.', 'rl.ppo.',
                          'loss.beta', 'loss.label_smoothing', 'loss.nll_coef', 'data.sources.',
                          'rl.ptx.sources.')


def leaves(config, prefix=''):
    for key, value in config.items():
        if hasattr(value, 'items'):
            yield from leaves(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value


def stage_keys(config):
    """`(key, key within its stage, value)` of every leaf: the pipeline holds each stage's config
    under the stage's name."""
    for key, value in leaves(config):
        head, _, rest = key.partition('.')
        yield key, rest if head in pipeline.STAGES else key, value


@OLD_LOADER
@pytest.mark.parametrize('name', CONFIGS)
def test_every_numeric_key_has_a_range(name):
    unchecked = sorted({key for _, key, value in stage_keys(parse(name))
                        if isinstance(value, (int, float)) and not isinstance(value, bool)
                        and key not in KEY_BOUNDS and not key.startswith(CHECKED_BY_DATACLASSES)})
    assert not unchecked, f'numeric keys without a range in gptstack.config.KEY_BOUNDS: {unchecked}'


@functools.cache
def defaults(name):
    return dict(leaves(parse(name)))


# Mostly a value of the key's own type, in range or not, sometimes anything at all.
ANYTHING = st.sampled_from(['', 'abc', 'None', 'true', '1e3', '-0', 'nan', '-inf', '0x10',
                            '[1, 2]', '(1,)', '2**63'])
NUMBERS = {
    int: st.integers(-3, 3) | st.sampled_from([10**9, -10**9]),
    float: st.floats(-2, 2) | st.sampled_from([0.0, -1.0, 1e9, math.nan, math.inf, -math.inf]),
}
WORDS = st.sampled_from(['', 'abc', 'k1', 'k3', 'gold', 'model', 'grpo', 'rloo', 'fsdp_tp', 'dp',
                         'ipo', 'best_worst', 'mixed', 'bfloat16', 'embedded:tasks', 'gsm8k',
                         'last_number', 'zero', 'reward', 'loss', 'constant', 'llama'])


def value_for(default):
    kind = type(default)
    if kind is bool:
        typed = st.booleans().map(str)
    elif kind in NUMBERS:
        typed = NUMBERS[kind].map(repr)
    else:
        typed = WORDS | NUMBERS[int].map(str)
    return st.one_of(typed, typed, typed, ANYTHING)


@st.composite
def overrides(draw):
    name = draw(st.sampled_from(sorted(CONFIGS)))
    values = defaults(name)
    chosen = draw(st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=3, unique=True))
    return name, [f'--config.{key}={draw(value_for(values[key]))}' for key in chosen]


@OLD_LOADER
@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(overrides())
def test_config_overrides_are_parsed_and_checked_or_refused_in_one_line(case):
    name, args = case
    base, validate = CONFIGS[name]
    try:
        config = parse(name, *base, *args)
    except flags.Error as error:  # the command line's usage error, in one line
        assert '\n' not in str(error).strip(), error
        return
    try:
        validate(config)
    except (ConfigError, DataError) as error:
        assert '\n' not in str(error), error
        return
    # Accepted: every value with a range is in it.
    for key, stage_key, value in stage_keys(config):
        if stage_key in KEY_BOUNDS and value is not None:
            assert KEY_BOUNDS[stage_key].holds(value), f'{key}={value!r} was accepted'
