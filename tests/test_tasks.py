"""The embedded task suite and its gold scorer: `python -m pytest -q tests/test_tasks.py`."""

import collections

import pytest

from gptstack.data import tasks


def test_deterministic_by_seed_and_disjoint_splits():
    a = tasks.generate('train', 300, seed=1)
    assert a == tasks.generate('train', 300, seed=1)
    assert a != tasks.generate('train', 300, seed=2)
    prompts = {split: {t.prompt for t in tasks.generate(split, 200, seed=0)}
               for split in tasks.SPLITS}
    assert len(prompts['train']) == 200  # distinct within a split
    assert not prompts['train'] & prompts['validation']
    assert not prompts['train'] & prompts['test']
    assert not prompts['validation'] & prompts['test']
    # A prompt's split does not depend on the seed.
    other_seed = {t.prompt for t in tasks.generate('test', 200, seed=7)}
    assert not other_seed & prompts['train']


def test_copy_drills_ask_for_their_own_text_back():
    drills = tasks.copy_drills(400, seed=0)
    assert drills == tasks.copy_drills(400, seed=0) != tasks.copy_drills(400, seed=1)
    for drill in drills:
        assert f'"{drill.answer}"' in drill.prompt and tasks.score(drill, drill.answer) == 1
        assert 2 <= len(drill.answer.split()) <= 12
    items = [item for d in drills for item in d.answer.split()]
    numbers = sum(item.isdigit() for item in items) / len(items)
    words = sum(item in tasks._WORDS + tasks._FILLER for item in items) / len(items)
    assert 0.25 < numbers < 0.35 and 0.38 < words < 0.48  # the rest are random letters
    assert len({d.answer for d in drills}) == len(drills)  # nothing to memorise
    # No drill is a task of any split.
    held_out = {t.prompt for split in tasks.SPLITS for t in tasks.generate(split, 300)}
    assert not held_out & {d.prompt for d in drills}


def test_every_family_and_level_appears():
    drawn = tasks.generate('train', 600, seed=0)
    assert set(collections.Counter(t.family for t in drawn)) == set(tasks.FAMILIES)
    assert {t.level for t in drawn} == set(tasks.LEVELS) == {1, 2, 3}


def test_reference_answers_score_one():
    for task in tasks.generate('validation', 400, seed=3):
        assert tasks.score(task, task.answer) == 1.0, task
        assert tasks.score(task, f'  {task.answer}\n') == 1.0


def make(family, level=2, seed=0):
    return next(t for t in tasks.generate('train', 400, seed=seed) if t.family == family
                and t.level == level)


def test_exact_answers_get_no_partial_credit():
    task = make('arithmetic')
    assert tasks.score(task, str(int(task.answer) + 1)) == 0.0
    assert tasks.score(task, f'The answer is {task.answer}') == 0.0
    assert tasks.score(task, '') == 0.0


def test_sorting_gives_credit_per_position():
    task = tasks.Task('sorting', 1, 'p', '1, 2, 3, 4', {'kind': 'sorted', 'answer': [1, 2, 3, 4]})
    assert tasks.score(task, '1, 2, 4, 3') == 0.5
    assert tasks.score(task, '1,2,3,4') == 1.0
    assert tasks.score(task, '1, 2, 3') == 0.0


def test_constraints_give_credit_per_constraint():
    task = tasks.Task('constraints', 3, 'p', 'x', {'kind': 'constraints', 'n_words': 4,
                                                   'include': 'river', 'exclude': 'blue',
                                                   'case': 'upper'})
    assert tasks.score(task, 'THE RIVER RUNS FAR') == 1.0
    assert tasks.score(task, 'the river runs far') == 0.75  # lowercase
    assert tasks.score(task, 'THE BLUE RIVER RUNS FAR') == 0.5  # 5 words, uses "blue"
    assert tasks.score(task, '') == 0.25  # only "blue" is (trivially) avoided


def test_prompts_read_as_instructions():
    for family in tasks.FAMILIES:
        task = make(family)
        assert task.prompt.endswith('.') and task.messages()[-1]['content'] == task.answer
        assert task.messages(with_answer=False) == [{'role': 'user', 'content': task.prompt}]


def test_bad_arguments():
    with pytest.raises(ValueError, match="task split 'dev'"):
        tasks.generate('dev', 1)
    with pytest.raises(ValueError, match=r"task families \['poetry'\]"):
        tasks.generate('train', 1, families=('poetry',))


def test_worked_examples_are_plain_text_of_train_tasks_only():
    documents = tasks.worked_documents(documents=50, per_document=8, seed=3)
    assert len(documents) == 50 and documents == tasks.worked_documents(50, 8, seed=3)
    text = '\n\n'.join(documents)
    assert '<|' not in text  # no special token, no chat template
    held_out = tasks.generate('validation', 300, 0) + tasks.generate('test', 300, 0)
    assert not any(t.prompt in text for t in held_out)
    # Each solved task is there with its answer, in one of the plain layouts.
    drawn = tasks.generate('train', 400, seed=3 + 1_000_003)
    for task in drawn[:20]:
        assert task.prompt in text or f'= {task.answer}' in text
