"""The pretraining report: the model, the mixture with each source's validation loss and bits
per byte, the loss, learning-rate and throughput curves, and samples at the last step."""

from __future__ import annotations

import json

import numpy as np

from gptstack import report
from gptstack.data import pretrain as data
from gptstack.metrics import read_metrics


def write(workdir, config, model_config, n_params, tokenized, tokenizer, wall_time,
          peak_source) -> str:
    records = read_metrics(workdir)
    train = [r for r in records if 'loss' in r]
    evals = [r for r in records if 'val_loss' in r]
    entropy = data.unigram_entropy(tokenized, model_config.vocab_size)
    last_eval = evals[-1] if evals else {}
    steps = train[-1]['step'] if train else 0
    tokens = steps * config.data.batch_size * config.data.seq_len
    throughput = [r['tokens_per_sec'] for r in train if 'tokens_per_sec' in r]
    mfu = [r['mfu'] for r in train if 'mfu' in r]
    val_series = {'validation (all)': 'val_loss'}
    val_series.update({f'validation {s.spec.name}': f'val/{s.spec.name}/loss' for s in tokenized})
    plots = [
        report.plot(records, {'train': 'loss', **val_series}, workdir / 'loss.png',
                    title='Loss', ylabel='nats per token',
                    hlines={f'unigram entropy {entropy:.2f}': entropy}),
        report.plot(records, {'seen once': 'val/copy/first', 'seen again': 'val/copy/second'},
                    workdir / 'copying.png', title='In-context copying (random tokens, repeated)',
                    ylabel='nats per token'),
        report.plot(records, {'learning rate': 'lr'}, workdir / 'lr.png',
                    title='Learning rate', ylabel='lr'),
        report.plot(records, {'tokens/s': 'tokens_per_sec'}, workdir / 'throughput.png',
                    title='Training throughput', ylabel='tokens per second'),
    ]
    summary = [
        ('model', f'{model_config.family}, {model_config.n_layer} layers, d_model '
                  f'{model_config.d_model}, {model_config.n_head} heads, {n_params:,} parameters'),
        ('tokenizer', f'{tokenizer.vocab_size} tokens, sha256 {tokenizer.sha256[:16]}…'),
        ('steps × batch × sequence', f'{steps} × {config.data.batch_size} × '
                                     f'{config.data.seq_len} = {tokens:,} tokens'),
        ('wall time', f'{wall_time / 60:.1f} min'),
        ('final train loss', train[-1]['loss'] if train else 'n/a'),
        ('final validation loss', last_eval.get('val_loss', 'n/a')),
        ('validation bits per byte', last_eval.get('val_bpb', 'n/a')),
        ('unigram entropy of the training mixture', entropy),
        ('in-context copying: loss of random tokens seen once · seen again (copy gain)',
         f"{last_eval['val/copy/first']:.3f} · {last_eval['val/copy/second']:.3f} "
         f"({last_eval['val/copy_gain']:+.3f} nats per token)"
         if 'val/copy_gain' in last_eval else 'n/a'),
        ('median tokens/s', float(np.median(throughput)) if throughput else 'n/a'),
        ('median MFU', f'{np.median(mfu):.1%} ({peak_source})' if mfu else 'n/a'),
    ]
    sources_rows = [(s.spec.name, s.spec.weight, s.meta['documents'], s.meta['train_tokens'],
                     s.meta['val_tokens'], s.meta['split'], sum(s.meta['skipped'].values()),
                     last_eval.get(f'val/{s.spec.name}/loss', 'n/a'),
                     last_eval.get(f'val/{s.spec.name}/bpb', 'n/a'))
                    for s in tokenized]
    samples = [json.loads(line) for line in (workdir / 'samples.jsonl').read_text().splitlines()
               if line] if (workdir / 'samples.jsonl').exists() else []
    final = [s for s in samples if s['step'] == steps] or samples[-len(config.sample.prompts):]
    sample_text = '\n\n'.join(report.code_block(s['prompt'] + s['completion']) for s in final)
    return report.write(workdir, 'Pretraining report', [
        ('Summary', report.table(['', ''], summary)),
        ('Data mixture', report.table(
            ['source', 'weight', 'documents', 'train tokens', 'val tokens', 'held out',
             'skipped', 'val loss', 'val bits/byte'], sources_rows)),
        ('Curves', '\n\n'.join(f'![{p}]({p})' for p in plots)),
        (f'Samples at step {steps}', sample_text or 'none'),
    ])
