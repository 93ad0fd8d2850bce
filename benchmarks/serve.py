"""Serving throughput and latency: new tokens per second and time to first token with 1, 8 and 32
concurrent streaming clients, against a real server.

    python -m benchmarks.serve --workdir=workdirs/pipeline/pretrain [--endpoint completions] \
        [--clients 1,8,32] [--requests 4] [--max_tokens 64] [--max_batch 8] [--out serve.json]

Starts `python -m experiments.serve` on the workdir (a free local port, `--max_batch`), waits
until it is ready, then for each concurrency runs that many clients (the `openai` package), each
sending `--requests` streamed requests one after another: the embedded tasks' held-out prompts,
as text to continue (`completions`, where a base model writes on to the token limit: decoding
dominates) or as a user turn (`chat`, where an SFT model's short answers make per-request costs
dominate), temperature 1 with a seed per request, `max_tokens` new tokens at most. Reports per
concurrency: new tokens per second over the wall time (tokens counted by the server's usage),
the median and 90th percentile of the time to the first content chunk, and requests per second;
and the new-token throughput of each concurrency relative to one client.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time

from gptstack.data import tasks
from tests.runs import serving


def one_request(client, endpoint: str, prompt: str, seed: int,
                max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text, new tokens) of one streamed request."""
    kwargs = dict(model='served', temperature=1.0, seed=seed, max_tokens=max_tokens,
                  stream=True, stream_options={'include_usage': True})
    start = time.perf_counter()
    if endpoint == 'chat':
        chunks = client.chat.completions.create(
            messages=[{'role': 'user', 'content': prompt}], **kwargs)
        text_of = lambda choice: choice.delta.content  # noqa: E731
    else:
        chunks = client.completions.create(prompt=prompt, **kwargs)
        text_of = lambda choice: choice.text  # noqa: E731
    first, usage = None, None
    for chunk in chunks:
        if chunk.choices and text_of(chunk.choices[0]) and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    return (time.perf_counter() - start if first is None else first), usage.completion_tokens


def measure(base_url: str, endpoint: str, clients: int, requests: int, max_tokens: int,
            prompts: list[str]) -> dict:
    import openai

    client = openai.OpenAI(base_url=f'{base_url}/v1', api_key='unused', max_retries=0)

    def run_client(c: int) -> list[tuple[float, int]]:
        return [one_request(client, endpoint, prompts[(c * requests + r) % len(prompts)],
                            c * requests + r, max_tokens) for r in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(run_client, range(clients)) for x in xs]
    seconds = time.perf_counter() - start
    first = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {'clients': clients, 'requests': len(results), 'new_tokens': tokens,
            'seconds': round(seconds, 3), 'new_tokens_per_s': round(tokens / seconds, 1),
            'requests_per_s': round(len(results) / seconds, 2),
            'first_token_s_median': round(statistics.median(first), 4),
            'first_token_s_p90': round(first[int(0.9 * (len(first) - 1))], 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='A language-model workdir, or hf:DIR.')
    parser.add_argument('--endpoint', choices=('completions', 'chat'), default='completions')
    parser.add_argument('--clients', default='1,8,32')
    parser.add_argument('--requests', type=int, default=4, help='Requests per client.')
    parser.add_argument('--max_tokens', type=int, default=64)
    parser.add_argument('--max_batch', type=int, default=8)
    parser.add_argument('--gather_ms', type=float, default=None,
                        help='The server\'s --gather_ms (default: its own).')
    parser.add_argument('--out', default='serve.json')
    args = parser.parse_args()
    prompts = [t.prompt for t in tasks.generate('test', 256, 0)]
    gather = [] if args.gather_ms is None else [f'--gather_ms={args.gather_ms}']
    with serving(args.workdir, f'--max_batch={args.max_batch}', *gather,
                 f'--max_new_tokens={args.max_tokens}', '--max_queue=1024',
                 '--name=served') as (base_url, lines):
        measure(base_url, args.endpoint, 1, 2, args.max_tokens, prompts)  # off the clock
        rows = [measure(base_url, args.endpoint, int(c), args.requests, args.max_tokens, prompts)
                for c in args.clients.split(',')]
    alone = rows[0]['new_tokens_per_s']
    for row in rows:
        row['throughput_vs_one_client'] = round(row['new_tokens_per_s'] / alone, 2)
    result = {'workdir': args.workdir, 'endpoint': args.endpoint, 'max_batch': args.max_batch,
              'gather_ms': args.gather_ms,
              'max_tokens': args.max_tokens,
              'server': [line.strip() for line in lines if line.startswith('serving')],
              'rows': rows}
    print(json.dumps(result, indent=1))
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
