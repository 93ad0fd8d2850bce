"""Run reports: `report.md` in the workdir with PNG plots drawn from `metrics.jsonl`.

A stage builds its report from small pieces (`plot`, `table`, `code_block`) and `write`s it;
plots use matplotlib's non-interactive backend and only process 0 writes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from gptstack.data import tasks
from gptstack.files import write_whole


def plot(records: list[dict], series: dict[str, str], path: str | os.PathLike, *, title: str,
         ylabel: str, hlines: dict[str, float] | None = None, logy: bool = False,
         xlabel: str = 'step', logx: bool = False) -> str:
    """Draws `{label: metric key}` against `step` from metric records; returns the file name."""
    path = pathlib.Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    _curves(ax, records, series, title=title, ylabel=ylabel, hlines=hlines, logy=logy,
            xlabel=xlabel, logx=logx)
    return _save(fig, path)


def panels(specs: Sequence[dict], path: str | os.PathLike, *, title: str) -> str:
    """Several `plot`s side by side in one figure: each spec holds `plot`'s arguments
    (`records`, `series`, `title`, `ylabel`, ...) but the path; returns the file name."""
    path = pathlib.Path(path)
    fig, axes = plt.subplots(1, len(specs), figsize=(4 * len(specs), 3.6), squeeze=False)
    for ax, spec in zip(axes[0], specs, strict=True):
        _curves(ax, **spec)
    fig.suptitle(title)
    return _save(fig, path)


def _curves(ax, records, series, *, title, ylabel, hlines=None, logy=False, xlabel='step',
            logx=False) -> None:
    for label, key in series.items():
        points = [(r['step'], r[key]) for r in records
                  if isinstance(r.get(key), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, marker='o' if len(points) < 30 else None,
                    markersize=3)
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle='--', linewidth=1, color='gray')
        ax.annotate(label, (0.01, value), xycoords=('axes fraction', 'data'), fontsize=8,
                    va='bottom', color='gray')
    if logy:
        ax.set_yscale('log')
    if logx:
        ax.set_xscale('log', base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1 or hlines:
        ax.legend(fontsize=8)


def _save(fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def bars(values: dict[str, float], errors: dict[str, float], path: str | os.PathLike, *,
         title: str, ylabel: str) -> str:
    """One bar per `{label: value}` with an error bar of `errors[label]`; returns the file
    name."""
    path = pathlib.Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(values)
    ax.bar(labels, [values[k] for k in labels], yerr=[errors.get(k, 0.0) for k in labels],
           capsize=6, color='tab:blue', alpha=0.8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis='y')
    return _save(fig, path)


def calibration_plot(predicted, observed, counts, path: str | os.PathLike, *, title: str,
                     xlabel: str) -> str:
    """Observed frequency against predicted probability per bin (marker area ~ count), with
    the diagonal of perfect calibration; returns the file name."""
    path = pathlib.Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color='gray', linestyle='--', linewidth=1, label='calibrated')
    counts = np.asarray(counts, np.float64)
    ax.scatter(predicted, observed, s=10 + 90 * counts / counts.max(), label='bins')
    ax.set(xlabel=xlabel, ylabel='observed frequency', title=title, xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='upper left')
    return _save(fig, path)


def histogram(series: dict[str, np.ndarray], path: str | os.PathLike, *, title: str,
              xlabel: str, bins: int = 40) -> str:
    """Overlaid histograms of `{label: values}` on shared bins; returns the file name."""
    path = pathlib.Path(path)
    values = np.concatenate([np.ravel(v) for v in series.values()])
    edges = np.linspace(values.min(), values.max() + 1e-9, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, v in series.items():
        ax.hist(np.ravel(v), bins=edges, alpha=0.55, label=label)
    ax.set(xlabel=xlabel, ylabel='count', title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; floats are shown with 4 significant digits."""
    def cell(x):
        return f'{x:.4g}' if isinstance(x, float) else str(x)
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(cell(x) for x in row) + ' |' for row in rows]
    return '\n'.join(lines)


def levels_before_after(before: dict, after: dict,
                        modes: Sequence[str] = ('greedy', 'sampled')) -> list[tuple]:
    """Table rows of `gptstack.evals.gold.by_level`'s scores in two metric records:
    `(level k, mode's score before, after, for each mode)` for each level either record holds
    ('n/a' where one lacks it)."""
    rows = []
    for level in tasks.LEVELS:
        keys = [f'gold/{mode}/level{level}' for mode in modes]
        if any(key in r for key in keys for r in (before, after)):
            rows.append((f'level {level}', *(r.get(key, 'n/a') for key in keys
                                               for r in (before, after))))
    return rows


def code_block(text: str) -> str:
    fence = '````' if '```' in text else '```'
    return f'{fence}text\n{text}\n{fence}'


def write(workdir: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> str:
    """Writes `<workdir>/report.md` from `(heading, markdown body)` sections; returns its path."""
    path = pathlib.Path(workdir) / 'report.md'
    parts = [f'# {title}\n']
    parts += [f'## {heading}\n\n{body}\n' for heading, body in sections]
    write_whole(path, '\n'.join(parts))
    return str(path)
