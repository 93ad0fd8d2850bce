"""The embedded instruction suite: procedurally generated tasks with an exact gold scorer.

Every task is a user prompt, a reference answer (the demonstration SFT learns from) and what the
scorer needs; `score(task, completion)` returns a number in [0, 1]. Six families at three
levels, calibrated so that level 1 is within reach of the default SFT model (a few million
parameters), level 3 beyond it, and level 2 between, where RL has room:
- arithmetic: a one-digit number added to or taken from one below 100 (1); two digits and two,
  or times one digit (2); three digits and three, or two digits times two (3);
- word problems: one to three steps of getting or giving away things;
- counting: the words of a sentence (longer at each level), the occurrences of a letter;
- string transforms: upper-case two words (1); reverse them or sort their letters (2); any of
  those on three words (3);
- sorting: three, four or six numbers of one, two or three digits, ascending or descending
  (partial credit per position);
- constraints: write exactly N words that include a word, in a given case (1), avoiding another
  word (2), or both (3); credit per satisfied constraint. Judging these is far easier than
  producing them, the property that makes comparisons cheaper than demonstrations.

Besides the six families, `copy_drills` writes training-only conversations that ask for a text
back verbatim: SFT mixes them among the tasks so that the model learns to take its answer's
content from the prompt, which every string, sorting and constraint task needs. They are never
held out or scored.

Answers are "answer only": the scorer compares the completion with surrounding whitespace
removed. A prompt's split (train 80%, validation 10%, test 10%) is a hash of its text, so the
splits are disjoint whatever the seed, and `generate(split, n, seed)` is deterministic. Some
level-1 cells hold only a few hundred distinct prompts (the constraints' about 240), so a large
draw holds fewer of them than of the others: results are reported by level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import string
from collections.abc import Callable

from gptstack.config import ConfigError

# The name that selects this suite wherever a stage reads data (`data.train`, `data.validation`).
EMBEDDED_TASKS = 'embedded:tasks'
SPLITS = {'train': (0, 80), 'validation': (80, 90), 'test': (90, 100)}
FAMILIES = ('arithmetic', 'word_problem', 'counting', 'string', 'sorting', 'constraints')
LEVELS = (1, 2, 3)

_WORDS = ('apple', 'river', 'stone', 'cloud', 'garden', 'window', 'silver', 'planet', 'forest',
          'candle', 'bridge', 'winter', 'summer', 'mountain', 'ocean', 'letter', 'pencil',
          'rabbit', 'orange', 'castle', 'thunder', 'meadow', 'harbor', 'lantern', 'python',
          'number', 'signal', 'marble', 'violet', 'copper')
_NAMES = ('Alice', 'Bob', 'Carol', 'Dave', 'Erin', 'Frank', 'Grace', 'Heidi', 'Ivan', 'Judy')
_ITEMS = ('apples', 'books', 'coins', 'marbles', 'pencils', 'stamps', 'shells', 'cards')
_FILLER = ('the', 'a', 'quiet', 'bright', 'small', 'old', 'green', 'near', 'over', 'and', 'with',
           'under', 'warm', 'blue', 'tall', 'soft')


@dataclasses.dataclass(frozen=True)
class Task:
    """One instruction: the prompt, a correct answer, and what the scorer checks."""

    family: str
    level: int
    prompt: str
    answer: str
    # For 'exact': the answer; 'sorted': the list; 'constraints': n_words/include/exclude/case.
    check: dict

    def messages(self, with_answer: bool = True) -> list[dict]:
        turns = [{'role': 'user', 'content': self.prompt}]
        return [*turns, {'role': 'assistant', 'content': self.answer}] if with_answer else turns


def split_of(prompt: str) -> str:
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def generate(split: str, n: int, seed: int = 0,
             families: tuple[str, ...] = FAMILIES) -> list[Task]:
    """`n` distinct tasks of `split`, families and levels drawn uniformly, by `seed`."""
    if split not in SPLITS:
        raise ConfigError(f'task split {split!r}: expected one of {sorted(SPLITS)}')
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ConfigError(f'task families {unknown}: expected some of {list(FAMILIES)}')
    rng = random.Random(f'{seed}-{split}')
    tasks, seen = [], set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ConfigError(f'could not draw {n} distinct {split} tasks; ask for fewer')
        family, level = rng.choice(families), rng.randint(LEVELS[0], LEVELS[-1])
        task = _MAKERS[family](rng, level)
        if task.prompt in seen or split_of(task.prompt) != split:
            continue
        seen.add(task.prompt)
        tasks.append(task)
    return tasks


# --- makers ---------------------------------------------------------------------------------
def _exact(family: str, level: int, prompt: str, answer) -> Task:
    answer = str(answer)
    return Task(family, level, prompt, answer, {'kind': 'exact', 'answer': answer})


def _arithmetic(rng: random.Random, level: int) -> Task:
    if level == 1:  # a one-digit number added to or taken from one below 100, never below 0
        op, b = rng.choice('+-'), rng.randint(1, 9)
        a = rng.randint(b if op == '-' else 1, 99)
    elif level == 2:  # two digits and two, or two digits times one
        op = rng.choice('+-*')
        a, b = rng.randint(10, 99), rng.randint(2, 9) if op == '*' else rng.randint(10, 99)
    else:  # three digits and three, or two digits times two
        op = rng.choice('+-*')
        a, b = ((rng.randint(10, 99), rng.randint(10, 99)) if op == '*' else
                (rng.randint(100, 999), rng.randint(100, 999)))
    result = {'+': a + b, '-': a - b, '*': a * b}[op]
    return _exact('arithmetic', level, f'What is {a} {op} {b}? Answer with the number only.',
                  result)


def _word_problem(rng: random.Random, level: int) -> Task:
    """`level` steps of getting or giving away; one small step at level 1."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(1, 9) if level == 1 else rng.randint(2, 20)
    story = [f'{name} has {total} {item}.']
    for _ in range(level):
        amount = rng.randint(1, (5, 9, 12)[level - 1])
        if rng.random() < 0.5 or amount > total:
            story.append(f'{name} gets {amount} more.')
            total += amount
        else:
            story.append(f'{name} gives away {amount}.')
            total -= amount
    question = f'How many {item} does {name} have now? Answer with the number only.'
    return _exact('word_problem', level, ' '.join([*story, question]), total)


def _counting(rng: random.Random, level: int) -> Task:
    """Words in a sentence, longer at each level; from level 2 on, also a letter's occurrences
    in a word (two words run together at level 3)."""
    if level > 1 and rng.random() < 0.5:
        word = rng.choice(_WORDS) + (rng.choice(_WORDS) if level == 3 else '')
        letter = rng.choice(sorted(set(word)))
        return _exact('counting', level, f'How many times does the letter "{letter}" appear in '
                                         f'"{word}"? Answer with the number only.',
                      word.count(letter))
    low, high = ((2, 5), (4, 10), (8, 15))[level - 1]
    words = [rng.choice(_FILLER + _WORDS) for _ in range(rng.randint(low, high))]
    return _exact('counting', level, f'How many words are in this sentence: "{" ".join(words)}"? '
                                     'Answer with the number only.', len(words))


def _string(rng: random.Random, level: int) -> Task:
    """Two words in capitals at level 1; two words reversed or their letters sorted at level 2;
    any of the three on three words at level 3."""
    text = ' '.join(rng.choice(_WORDS) for _ in range(2 if level < 3 else 3))
    kind = 'upper' if level == 1 else rng.choice(('reverse', 'sort') if level == 2 else
                                                   ('reverse', 'upper', 'sort'))
    if kind == 'reverse':
        return _exact('string', level, f'Reverse the text "{text}". Reply with the result only.',
                      text[::-1])
    if kind == 'upper':
        return _exact('string', level, f'Write "{text}" in capital letters. Reply with the '
                                       'result only.', text.upper())
    letters = text.replace(' ', '')
    return _exact('string', level, f'Sort the letters of "{letters}" in alphabetical order. '
                                   'Reply with the letters only.', ''.join(sorted(letters)))


def _sorting(rng: random.Random, level: int) -> Task:
    """Three one-digit numbers at level 1, four of two digits at 2, six of three at 3."""
    count, high = ((3, 9), (4, 99), (6, 999))[level - 1]
    numbers = rng.sample(range(1, high + 1), count)
    descending = rng.random() < 0.5
    ordered = sorted(numbers, reverse=descending)
    order = 'descending' if descending else 'ascending'
    prompt = (f'Sort these numbers in {order} order: {", ".join(map(str, numbers))}. Reply with '
              'the numbers separated by commas.')
    answer = ', '.join(map(str, ordered))
    return Task('sorting', level, prompt, answer, {'kind': 'sorted', 'answer': ordered})


def _constraints(rng: random.Random, level: int) -> Task:
    """Exactly N words including a word, and in a given case (1) or avoiding another word (2),
    or both (3)."""
    n_words = rng.randint(*((2, 5), (3, 7), (4, 10))[level - 1])
    include = rng.choice(_WORDS)
    case = rng.choice(('lower', 'upper')) if level != 2 else None
    exclude = rng.choice([w for w in _FILLER if w not in ('a', 'the')]) if level > 1 else None
    parts = [f'Write exactly {n_words} words that include the word "{include}"']
    if exclude:
        parts.append(f'do not use the word "{exclude}"')
    if case:
        parts.append(f'write every word in {case}case')
    prompt = ', '.join(parts) + '. Reply with the words only.'
    pool = [w for w in _FILLER + _WORDS if w not in (include, exclude)]
    words = [rng.choice(pool) for _ in range(n_words - 1)]
    words.insert(rng.randint(0, n_words - 1), include)
    answer = ' '.join(words)
    answer = answer.upper() if case == 'upper' else answer
    return Task('constraints', level, prompt, answer,
                {'kind': 'constraints', 'n_words': n_words, 'include': include,
                 'exclude': exclude, 'case': case})


_MAKERS: dict[str, Callable[[random.Random, int], Task]] = {
    'arithmetic': _arithmetic, 'word_problem': _word_problem, 'counting': _counting,
    'string': _string, 'sorting': _sorting, 'constraints': _constraints}


# --- worked examples as plain text -----------------------------------------------------------
# How a solved task reads in the pretraining corpus: a question and its answer in a few plain
# layouts (never the chat template), the first of which is how the base model is prompted.
_LAYOUTS = ('Question: {prompt}\nAnswer: {answer}', 'Q: {prompt}\nA: {answer}',
            '{prompt}\n{answer}', 'Problem: {prompt}\nSolution: {answer}')
_EQUATION = re.compile(r'What is (\d+) ([-+*]) (\d+)\?')


def worked_text(task: Task, rng: random.Random) -> str:
    """A solved task as plain text in one of the layouts (an arithmetic one sometimes as the
    bare equation)."""
    equation = _EQUATION.match(task.prompt)
    if equation and rng.random() < 0.3:
        a, op, b = equation.groups()
        return f'{a} {op} {b} = {task.answer}'
    return rng.choice(_LAYOUTS).format(prompt=task.prompt, answer=task.answer)


def worked_documents(documents: int = 4000, per_document: int = 16,
                     seed: int = 0) -> list[str]:
    """Pages of solved train-split tasks as plain text: the worked examples of the pretraining
    mixture (the role of the LLaMA table's StackExchange and ArXiv rows). A task's split is a hash
    of its prompt, so no validation or test task, and no prompt the pipeline compares models on,
    appears in them."""
    drawn = generate('train', documents * per_document, seed=seed + 1_000_003)
    rng = random.Random(f'{seed}-worked')
    return ['\n\n'.join(worked_text(task, rng) for task in drawn[i:i + per_document])
            for i in range(0, len(drawn), per_document)]


# --- copy drills ----------------------------------------------------------------------------
COPY_DRILL = 'copy_drill'
_COPY_FORMS = ('Repeat exactly: "{}"', 'Copy this text: "{}". Reply with the text only.',
               'Say "{}" back to me.')


def copy_drills(n: int, seed: int = 0) -> list[Task]:
    """`n` conversations that ask for a text back verbatim, for training only: the text is 2-12
    items, each a task word (40%), a number up to 999 (30%) or 2-6 random lowercase letters
    (30%), so most texts are new and only reading the prompt answers them."""
    rng = random.Random(f'{seed}-{COPY_DRILL}')
    words = _WORDS + _FILLER

    def item() -> str:
        kind = rng.random()
        if kind < 0.4:
            return rng.choice(words)
        if kind < 0.7:
            return str(rng.randint(1, 999))
        return ''.join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))

    drills = []
    for _ in range(n):
        text = ' '.join(item() for _ in range(rng.randint(2, 12)))
        drills.append(_exact(COPY_DRILL, 1, rng.choice(_COPY_FORMS).format(text), text))
    return drills


# --- the gold scorer ------------------------------------------------------------------------
def score(task: Task, completion: str) -> float:
    """Gold score of `completion` for `task`, in [0, 1].

    exact: 1 if the completion, stripped of surrounding whitespace, equals the answer.
    sorted: the fraction of positions holding the right number (0 if the count differs).
    constraints: the fraction of constraints met (word count, inclusion, exclusion, case).
    """
    text = completion.strip()
    check = task.check
    if check['kind'] == 'exact':
        return float(text == check['answer'])
    if check['kind'] == 'sorted':
        items = [t.strip() for t in text.split(',')]
        if len(items) != len(check['answer']):
            return 0.0
        return sum(a == str(b) for a, b in zip(items, check['answer'], strict=True)) / len(items)
    words = text.split()
    lowered = [re.sub(r'[^\w]', '', w).lower() for w in words]
    met = [len(words) == check['n_words'], check['include'] in lowered]
    if check['exclude']:
        met.append(check['exclude'] not in lowered)
    if check['case']:
        met.append(bool(words) and all(getattr(w, f'is{check["case"]}')() for w in words))
    return sum(met) / len(met)
