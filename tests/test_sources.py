"""Corpus readers and their errors: `python -m pytest -q tests/test_sources.py`."""

import json
import re

import pytest

from gptstack.data.sources import (
    DataError,
    SkipBudget,
    SourceSpec,
    python_code_documents,
    python_prose_documents,
    read_source,
)


def read(tmp_path, *paths, max_skips=0, field='text'):
    spec = SourceSpec('test', tuple(str(tmp_path / p) for p in paths), text_field=field)
    budget = SkipBudget(max_skips)
    return list(read_source(spec, budget)), budget


def write_jsonl(path, lines):
    path.write_bytes(b''.join((line if isinstance(line, bytes) else line.encode()) + b'\n'
                              for line in lines))


def test_txt_jsonl_directories_and_globs(tmp_path):
    (tmp_path / 'a.txt').write_text('first document\n')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'b.txt').write_text('second')
    write_jsonl(tmp_path / 'sub' / 'c.jsonl', [json.dumps({'text': 'third'}), '',
                                               json.dumps({'text': 'fourth', 'id': 4})])
    docs, _ = read(tmp_path, '.')
    assert docs == ['first document\n', 'second', 'third', 'fourth']
    docs, _ = read(tmp_path, 'sub/*.jsonl')
    assert docs == ['third', 'fourth']
    docs, _ = read(tmp_path, '**/*.txt')
    assert docs == ['first document\n', 'second']


@pytest.mark.parametrize('line, message', [
    ('{"text": "ok"', 'bad.jsonl:2: invalid JSON (Expecting'),
    ('["text"]', 'bad.jsonl:2: expected a JSON object, got list'),
    ('{"body": "x"}', "bad.jsonl:2: missing field 'text' (fields: ['body'])"),
    ('{"text": 42}', "bad.jsonl:2: field 'text' must be a string, got int"),
    ('{"text": "   "}', "bad.jsonl:2: field 'text' is empty"),
    (b'{"text": "caf\xe9"}', 'bad.jsonl:2: invalid UTF-8 at byte 13 of the line'),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, message):
    write_jsonl(tmp_path / 'bad.jsonl', [json.dumps({'text': 'fine'}), line])
    with pytest.raises(DataError, match=re.escape(message)):
        read(tmp_path, 'bad.jsonl')


def test_custom_text_field(tmp_path):
    write_jsonl(tmp_path / 'd.jsonl', [json.dumps({'content': 'hello'})])
    assert read(tmp_path, 'd.jsonl', field='content')[0] == ['hello']
    with pytest.raises(DataError, match=re.escape("d.jsonl:1: missing field 'body'")):
        read(tmp_path, 'd.jsonl', field='body')


def test_undecodable_text_file(tmp_path):
    (tmp_path / 'latin1.txt').write_bytes(b'line one\nline two caf\xe9\n')
    with pytest.raises(DataError, match=re.escape('latin1.txt:2: invalid UTF-8 at byte 21')):
        read(tmp_path, 'latin1.txt')


@pytest.mark.parametrize('paths, message', [
    (('missing.txt',), "data source 'test': {tmp}/missing.txt does not exist"),
    (('empty_dir',), "data source 'test': no .txt or .jsonl files match {tmp}/empty_dir"),
    (('*.nothing',), "data source 'test': no .txt or .jsonl files match {tmp}/*.nothing"),
    (('blank.txt',), '{tmp}/blank.txt: empty document'),
    (('data.csv',), "{tmp}/data.csv: unsupported file type '.csv'"),
    (('only_blank_lines.jsonl',), "data source 'test': no documents in"),
])
def test_missing_or_empty_sources(tmp_path, paths, message):
    (tmp_path / 'empty_dir').mkdir()
    (tmp_path / 'blank.txt').write_text('  \n')
    (tmp_path / 'data.csv').write_text('a,b\n')
    (tmp_path / 'only_blank_lines.jsonl').write_text('\n\n')
    with pytest.raises(DataError, match=re.escape(message.format(tmp=tmp_path))):
        read(tmp_path, *paths)


def test_skips_are_counted_and_capped(tmp_path):
    write_jsonl(tmp_path / 'mixed.jsonl', [json.dumps({'text': 'a'}), 'not json',
                                           json.dumps({'text': 'b'}), json.dumps({'x': 1})])
    docs, budget = read(tmp_path, 'mixed.jsonl', max_skips=2)
    assert docs == ['a', 'b']
    assert budget.skipped == 2
    assert dict(budget.by_reason) == {'bad json': 1, 'missing field': 1}
    with pytest.raises(DataError, match=re.escape(
            "mixed.jsonl:4: missing field 'text' (fields: ['x']) (more than max_skips=1 "
            "malformed records; already skipped {'bad json': 1})")):
        read(tmp_path, 'mixed.jsonl', max_skips=1)


def test_bad_source_specs():
    with pytest.raises(DataError, match="data source 'x': weight=0 must be > 0"):
        SourceSpec('x', ('a.txt',), weight=0)
    with pytest.raises(DataError, match=re.escape("data source 'x': unknown key(s) ['wieght']")):
        SourceSpec.from_dict({'name': 'x', 'paths': ['a.txt'], 'wieght': 1})
    with pytest.raises(DataError, match="unknown embedded corpus 'embedded:klingon'"):
        list(read_source(SourceSpec('x', ('embedded:klingon',)), SkipBudget()))


def test_embedded_corpus_is_code_and_english():
    code = list(python_code_documents())
    assert len(code) > 100
    assert sum('def ' in doc for doc in code) > 0.8 * len(code)
    prose = list(python_prose_documents())
    assert len(prose) > 100
    text = ' '.join(prose)
    assert sum(len(doc) for doc in prose) > 500_000
    # English: the commonest words show up often.
    assert text.count(' the ') > 5_000 and text.count(' is ') > 1_000
