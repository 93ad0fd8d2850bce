"""The metrics log: non-finite values, torn and missing files (`pytest tests/test_metrics.py`)."""

import json
import math

import pytest

from gptstack import report
from gptstack.data.sources import DataError
from gptstack.metrics import NONFINITE, MetricsWriter, NonFinite, read_metrics, truncate_jsonl


def test_nonfinite_values_are_null_with_their_reason_and_read_back_as_n_a(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(3, {'loss': 0.5, 'val_accuracy_stderr': float('nan'), 'gap': -math.inf,
                     'pairs': 1})
    writer.close()
    stored = json.loads((tmp_path / 'metrics.jsonl').read_text())
    assert stored == {'step': 3, 'loss': 0.5, 'val_accuracy_stderr': None, 'gap': None,
                      'pairs': 1, NONFINITE: {'val_accuracy_stderr': 'nan', 'gap': '-inf'}}
    [record] = read_metrics(tmp_path)
    assert NONFINITE not in record and record['loss'] == 0.5
    stderr, gap = record['val_accuracy_stderr'], record['gap']
    assert isinstance(stderr, NonFinite) and math.isnan(stderr) and gap == -math.inf
    assert report.table(['stderr', 'gap', 'loss'], [(stderr, gap, record['loss'])]).endswith(
        '| n/a (nan) | n/a (-inf) | 0.5 |')
    assert f'{stderr:+.3f} / {gap:.1%}' == 'n/a (nan) / n/a (-inf)'


def test_a_torn_last_line_is_left_out_and_trimmed_on_resume(tmp_path, caplog):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2]
    assert 'leaving out its last line, cut short by an interrupted write' in caplog.text
    truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_a_damaged_middle_line_or_a_missing_log_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r'metrics.jsonl is missing: the report is made from it'):
        read_metrics(tmp_path)
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(DataError, match=r'metrics.jsonl:2: not a JSON record .*damaged'):
        read_metrics(tmp_path)
