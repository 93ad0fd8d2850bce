"""Corpus readers: text files, JSONL, directories and globs of both, and the embedded default.

- A `.txt` file is one document (BOM dropped, CRLF read as LF); a `.jsonl` file holds one
  document per line in a string field (`text` unless configured). A directory stands for every
  `.txt`/`.jsonl` file below it.
- Malformed input raises `DataError` naming the file, the line and the field. With a skip budget
  (`max_skips > 0`) malformed records are skipped instead, counted by reason and logged, and the
  first record past the budget still raises. Blank JSONL lines are not records and are ignored.
- The embedded default corpus needs no download and exists on any CPython 3.10+ install:
  `embedded:python_code` is the standard library's own source (without its test suites) and
  `embedded:python_prose` is the English that ships with Python: the reference manual's topics
  from `pydoc_data` and the standard library's docstrings.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import glob
import gzip
import inspect
import json
import logging
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator, Mapping

import numpy as np

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = 'embedded:'
SUFFIXES = ('.txt', '.jsonl', '.jsonl.gz')
# Standard-library folders that are not library source written by people: test suites, demos,
# vendored packages, generated codec tables (`encodings`) and the reference-manual text that the
# prose corpus already holds (`pydoc_data`).
_STDLIB_EXCLUDE = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', 'turtledemo',
                   '__pycache__', 'ensurepip', 'encodings', 'pydoc_data'}


class DataError(ValueError):
    """Malformed or missing input data; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One corpus of a mixture: a name, where its documents are, and its sampling weight."""

    name: str
    paths: tuple[str, ...]
    weight: float = 1.0
    text_field: str = 'text'

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, 'paths', (self.paths,))
        object.__setattr__(self, 'paths', tuple(self.paths))
        if not self.name:
            raise DataError('data source: a source needs a non-empty name')
        if not self.paths:
            raise DataError(f'data source {self.name!r}: paths is empty')
        if not self.weight > 0:
            raise DataError(f'data source {self.name!r}: weight={self.weight} must be > 0')

    @classmethod
    def from_dict(cls, values: Mapping) -> SourceSpec:
        values = dict(values.to_dict() if hasattr(values, 'to_dict') else values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f'data source {values.get("name")!r}: unknown key(s) {unknown}; '
                            f'expected some of {sorted(known)}')
        return cls(**values)


class SkipBudget:
    """Lets up to `max_skips` malformed records be skipped (0: the first one raises)."""

    def __init__(self, max_skips: int = 0):
        self.max_skips = max_skips
        self.by_reason: collections.Counter[str] = collections.Counter()

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def reject(self, error: DataError, reason: str) -> None:
        """Records a malformed record, or raises `error` when the budget is spent."""
        if self.skipped >= self.max_skips:
            if self.max_skips:
                raise DataError(f'{error} (more than max_skips={self.max_skips} malformed '
                                f'records; already skipped {dict(self.by_reason)})')
            raise error
        self.by_reason[reason] += 1
        # The first of each reason on the console; every one in the run's log file.
        first = self.by_reason[reason] == 1
        log.log(logging.WARNING if first else logging.DEBUG,
                'skipping malformed record (%d/%d)%s: %s', self.skipped, self.max_skips,
                ' (more like it are counted; each is in the run log)' if first else '', error)


# --- files --------------------------------------------------------------------------------------
def expand_paths(patterns: tuple[str, ...], source: str = '') -> list[pathlib.Path]:
    """Files named by `patterns` (files, directories, globs), sorted, each `.txt`, `.jsonl` or
    `.jsonl.gz`."""
    files = []
    for pattern in patterns:
        path = pathlib.Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob('*') if p.name.endswith(SUFFIXES) and p.is_file())
        elif any(c in pattern for c in '*?['):
            found = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True)
                           if pathlib.Path(p).is_file())
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f'data source {source!r}: {pattern} does not exist')
        if not found:
            raise DataError(f'data source {source!r}: no .txt or .jsonl files match {pattern}')
        for p in found:
            if not p.name.endswith(SUFFIXES):
                raise DataError(f'{p}: unsupported file type {p.suffix!r}; expected .txt '
                                '(one document per file) or .jsonl/.jsonl.gz (one record per '
                                'line)')
        files += found
    return files


def read_text_file(path: pathlib.Path, budget: SkipBudget) -> Iterator[str]:
    """The whole file as one document (a UTF-8 byte-order mark is dropped and Windows line
    endings become newlines, as Python's text mode does)."""
    data = path.read_bytes().removeprefix(b'\xef\xbb\xbf')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        budget.reject(DataError(f'{path}:{line}: invalid UTF-8 at byte {e.start}'), 'bad utf-8')
        return
    if not text.strip():
        budget.reject(DataError(f'{path}: empty document'), 'empty')
        return
    yield text.replace('\r\n', '\n')


def read_json_records(path: pathlib.Path, budget: SkipBudget) -> Iterator[tuple[str, dict]]:
    """`(location, object)` for every JSON object line of a JSONL file (gzip-compressed when
    its name ends in `.gz`); `location` is `path:line`. Lines that are not valid UTF-8 JSON
    objects go to the skip budget. A UTF-8 byte-order mark at the start of the file (as some
    spreadsheet and editor exports write) and CRLF line ends are accepted."""
    with (gzip.open if path.name.endswith('.gz') else open)(path, 'rb') as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f'{path}:{number}'
            try:
                record = json.loads(raw.decode('utf-8-sig' if number == 1 else 'utf-8'))
            except UnicodeDecodeError as e:
                budget.reject(DataError(f'{where}: invalid UTF-8 at byte {e.start} of the line'),
                              'bad utf-8')
                continue
            except json.JSONDecodeError as e:
                budget.reject(DataError(f'{where}: invalid JSON ({e.msg} at column {e.colno})'),
                              'bad json')
                continue
            if not isinstance(record, dict):
                budget.reject(DataError(f'{where}: expected a JSON object, got '
                                        f'{type(record).__name__}'), 'not an object')
                continue
            yield where, record


def read_jsonl(path: pathlib.Path, field: str, budget: SkipBudget) -> Iterator[str]:
    """The string `field` of every JSON object line."""
    for where, record in read_json_records(path, budget):
        if field not in record:
            budget.reject(DataError(f'{where}: missing field {field!r} (fields: '
                                    f'{sorted(record)})'), 'missing field')
        elif not isinstance(record[field], str):
            budget.reject(DataError(f'{where}: field {field!r} must be a string, got '
                                    f'{type(record[field]).__name__}'), 'not a string')
        elif not record[field].strip():
            budget.reject(DataError(f'{where}: field {field!r} is empty'), 'empty')
        else:
            yield record[field]


def read_source(spec: SourceSpec, budget: SkipBudget) -> Iterator[str]:
    """Every document of a source, in a deterministic order.

    Raises:
        DataError: on malformed input past the skip budget, or when the source has no document.
    """
    count = 0
    for pattern in spec.paths:
        if pattern.startswith(EMBEDDED_PREFIX):
            name = pattern[len(EMBEDDED_PREFIX):]
            if name not in EMBEDDED:
                raise DataError(f'data source {spec.name!r}: unknown embedded corpus {pattern!r}; '
                                f'expected one of {[EMBEDDED_PREFIX + k for k in EMBEDDED]}')
            documents = EMBEDDED[name]()
        else:
            documents = (doc for path in expand_paths((pattern,), spec.name)
                         for doc in (read_jsonl(path, spec.text_field, budget)
                                     if path.suffix != '.txt' else read_text_file(path, budget)))
        for doc in documents:
            count += 1
            yield doc
    if not count:
        raise DataError(f'data source {spec.name!r}: no documents in {list(spec.paths)}')


def read_records(paths: str, reader, what: str, max_skips: int) -> list:
    """Every record that `reader(path, budget)` yields from the comma-separated file patterns
    `paths` (conversations, comparisons, prompts), in order; malformed records count against
    one budget of `max_skips` and are logged.

    Raises:
        DataError: past the skip budget, or when no record is left.
    """
    budget = SkipBudget(max_skips)
    records = [record for pattern in paths.split(',')
               for path in expand_paths((pattern.strip(),), what)
               for record in reader(path, budget)]
    if budget.skipped:
        log.warning('%s: skipped %d malformed records %s', what, budget.skipped,
                    dict(budget.by_reason))
    if not records:
        raise DataError(f'no {what} in {paths}')
    return records


def hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """`(train, held out)`: a seeded `fraction` of the records (at least one) held out, both
    parts in their original order."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_held = max(1, round(fraction * len(records)))
    return ([records[i] for i in sorted(order[n_held:])],
            [records[i] for i in sorted(order[:n_held])])


def fingerprint_inputs(spec: SourceSpec) -> list:
    """What identifies a source's content cheaply: file paths, sizes and mtimes (embedded
    corpora: the Python version and standard-library location)."""
    parts: list = [spec.text_field]
    for pattern in spec.paths:
        if pattern.startswith(EMBEDDED_PREFIX):
            parts.append([pattern, sys.version, _stdlib_dir()])
        else:
            for path in expand_paths((pattern,), spec.name):
                stat = path.stat()
                parts.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return parts


# --- the embedded default corpus ----------------------------------------------------------------
def _stdlib_dir() -> str:
    return sysconfig.get_paths()['stdlib']


def _stdlib_sources() -> list[pathlib.Path]:
    root = pathlib.Path(_stdlib_dir())
    return sorted(p for p in root.rglob('*.py')
                  if not _STDLIB_EXCLUDE.intersection(p.relative_to(root).parts[:-1])
                  and not p.name.startswith('test_'))


def python_code_documents() -> Iterator[str]:
    """The standard library's source files, one document each."""
    for path in _stdlib_sources():
        text = path.read_text(encoding='utf-8', errors='strict')
        if text.strip():
            yield text


def python_prose_documents() -> Iterator[str]:
    """English prose that ships with Python: reference-manual topics and module docstrings."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data into a separate package
        log.warning("pydoc_data is not installed: embedded prose has docstrings only")
        topics = {}
    yield from (text for _, text in sorted(topics.items()) if text.strip())
    for path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few files are templates or target other versions
            continue
        docstrings = [inspect.cleandoc(doc) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and (doc := ast.get_docstring(node, clean=False)) and len(doc) > 40]
        if docstrings:
            yield '\n\n'.join(docstrings)


def worked_example_documents() -> Iterator[str]:
    """Solved instruction tasks as plain text (`gptstack.data.tasks.worked_documents`)."""
    from gptstack.data import tasks

    yield from tasks.worked_documents()


EMBEDDED = {'python_code': python_code_documents, 'python_prose': python_prose_documents,
            'worked_examples': worked_example_documents}


def describe_source(spec: SourceSpec) -> str:
    return f'{spec.name} (weight {spec.weight:g}): {", ".join(map(os.fspath, spec.paths))}'


def specs_from_config(sources: Mapping) -> list[SourceSpec]:
    """`{name: {paths: 'a,b', weight, text_field}}` (a config's `data.sources`) -> SourceSpecs."""
    sources = sources.to_dict() if hasattr(sources, 'to_dict') else dict(sources)
    if not sources:
        raise DataError('data.sources is empty: name at least one corpus')
    specs = []
    for name, values in sources.items():
        values = dict(values)
        paths = values.pop('paths', None)
        if not isinstance(paths, str) or not paths.strip():
            raise DataError(f'data.sources.{name}.paths: expected a comma-separated string of '
                            f'files, directories, globs or embedded:<name>, got {paths!r}')
        specs.append(SourceSpec.from_dict(
            {'name': name, 'paths': tuple(p.strip() for p in paths.split(',')), **values}))
    return specs
