"""The OpenAI-compatible server: `python -m pytest -q tests/test_serving.py`.

A server runs as a subprocess on a free local port, serving the quick pipeline's SFT model, and
the real `openai` client talks to it. Its answers are checked against the library itself: the
same sampler's greedy replies, the same model's log-probabilities.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptstack.chat import sample_replies
from gptstack.data.tokenizer import render_prompt
from gptstack.lineage import load_policy
from gptstack.sampling import SamplingParams
from gptstack.serving import engine as engine_lib
from tests.runs import ROOT, SERVE_MAX_NEW, free_port, serving

openai = pytest.importorskip('openai')
QUESTIONS = ['Write "marble number" in capital letters. Reply with the result only.',
             'Erin has 7 coins. Erin gets 1 more. How many coins does Erin have now? '
             'Answer with the number only.',
             'What is 12 plus 30?', 'Name three colours.', 'Reverse the word "garden".',
             'Write exactly 3 words that include the word "bridge".', 'Say hello.',
             'What is the opposite of cold?']


@pytest.fixture(scope='module')
def client(sft_server):
    return openai.OpenAI(base_url=f'{sft_server}/v1', api_key='unused', max_retries=0)


@pytest.fixture(scope='module')
def policy(sft_workdir):
    return load_policy(sft_workdir)


def chat(question):
    return [{'role': 'user', 'content': question}]


def post(base_url, path, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data,
                                     headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_greedy_chat_equals_the_library_sampler_streamed_or_not(client, policy):
    """The server's greedy reply to a conversation is the library's: the same text from the
    same tokens, whole or streamed; the usage counts our tokens."""
    sampler = policy.sampler(8, SERVE_MAX_NEW, chat=True)
    conversations = [chat(q) for q in QUESTIONS]
    expected = sample_replies(sampler, policy.params, policy.tokenizer, conversations,
                              jax.random.key(0), SamplingParams(temperature=0.0))
    out = sampler(policy.params, [render_prompt(policy.tokenizer, c) for c in conversations],
                  jax.random.key(0), SamplingParams(temperature=0.0))
    assert any(reply[0] for reply in expected)  # the model says something
    for i, conversation in enumerate(conversations):
        reply = client.chat.completions.create(model='sft', messages=conversation,
                                               temperature=0)
        assert reply.choices[0].message.content == expected[i][0]
        assert reply.choices[0].message.role == 'assistant'
        assert reply.usage.completion_tokens == out['lengths'][i]
        assert reply.usage.prompt_tokens == len(render_prompt(policy.tokenizer, conversation))
        stop_token = out['tokens'][i, out['lengths'][i] - 1] in (policy.tokenizer.eot_id,
                                                                 policy.tokenizer.end_of_turn_id)
        assert reply.choices[0].finish_reason == ('stop' if stop_token else 'length')
        chunks = list(client.chat.completions.create(
            model='sft', messages=conversation, temperature=0, stream=True,
            stream_options={'include_usage': True}))
        assert len({c.id for c in chunks}) == 1
        assert chunks[0].choices[0].delta.role == 'assistant'
        assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
        text = ''.join(c.choices[0].delta.content or '' for c in chunks[:-1])
        assert text == expected[i][0]


def test_a_stream_arrives_while_it_is_decoded(client):
    """The first chunk of a long reply arrives well before its last: tokens are sent as they
    are decoded, not all at the end."""
    for seed in range(20):  # a sampled reply long enough to time
        times, start = [], time.perf_counter()
        chunks = client.completions.create(model='sft', prompt='def parse(',
                                           max_tokens=SERVE_MAX_NEW, temperature=1.0, seed=seed,
                                           stream=True)
        n = 0
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                n += 1
        if n >= 16:
            break
    assert n >= 16
    end = times[-1]
    # Sent at the end, every chunk would arrive within a few milliseconds of the last.
    assert (end - times[0]) > 0.3 * (end - start), (times[0] - start, end - start)


def test_concurrent_requests_get_the_replies_they_get_alone(client):
    """Eight greedy requests at once (one batch) get the replies each gets alone; so do eight
    seeded sampled ones, whose rows draw from their own seeds."""
    def ask(i, sampled=False):
        kwargs = dict(temperature=1.0, seed=100 + i) if sampled else dict(temperature=0)
        reply = client.chat.completions.create(model='sft', messages=chat(QUESTIONS[i]),
                                               **kwargs)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    for sampled in (False, True):
        alone = [ask(i, sampled) for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(8), [sampled] * 8))
        assert together == alone


def test_thirty_two_concurrent_streams_all_complete(client):
    def stream(i):
        chunks = list(client.chat.completions.create(
            model='sft', messages=chat(QUESTIONS[i % 8]), temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ('stop', 'length')
        return ''.join(c.choices[0].delta.content or '' for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(stream, range(32)))
    assert replies == replies[:8] * 4


def test_echo_logprobs_equal_the_models_own(client, policy):
    """`echo` with `logprobs` and one new token: every prompt token's log-probability (after
    the implicit <|endoftext|>) equals the model's, computed here on the same ids; the top
    alternative of a greedy token is its own value; one generated token follows."""
    tok = policy.tokenizer
    prompts = [tok.encode('The quick brown fox'), tok.encode('def parse(text):'),
               tok.encode('x')]
    reply = client.completions.create(model='sft', prompt=prompts, max_tokens=1, temperature=0,
                                      echo=True, logprobs=2)
    model = policy.graphdef, policy.params
    from flax import nnx
    for choice, prompt in zip(sorted(reply.choices, key=lambda c: c.index), prompts,
                              strict=True):
        ids = [tok.eot_id, *prompt]
        logits = nnx.merge(*model)(jnp.asarray([ids]))[0]
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        expected = [log_probs[t, ids[t + 1]] for t in range(len(prompt))]
        got = choice.logprobs.token_logprobs
        assert len(got) == len(prompt) + 1 and len(choice.logprobs.top_logprobs) == len(got)
        np.testing.assert_allclose(got[:-1], expected, atol=1e-4)
        greedy_next = int(np.argmax(log_probs[-1]))
        assert choice.logprobs.tokens[-1] == tok.decode([greedy_next])
        np.testing.assert_allclose(got[-1], log_probs[-1, greedy_next], atol=1e-4)
        for t, (value, top) in enumerate(zip(got, choice.logprobs.top_logprobs, strict=True)):
            assert len(top) <= 2 and max(top.values()) >= value
            if t < len(prompt) and ids[t + 1] == int(np.argmax(log_probs[t])):
                assert max(top.values()) == value  # bit for bit: how clients test greediness
        assert choice.text == tok.decode(prompt) + tok.decode([greedy_next])


def test_stop_strings_and_max_tokens(client):
    prompt = 'def parse(text):\n'
    whole = client.completions.create(model='sft', prompt=prompt, max_tokens=SERVE_MAX_NEW,
                                      temperature=0)
    text = whole.choices[0].text
    five = client.completions.create(model='sft', prompt=prompt, max_tokens=5, temperature=0)
    assert five.choices[0].finish_reason == 'length' and five.usage.completion_tokens == 5
    assert text.startswith(five.choices[0].text)
    # A stop string made of the reply's own text: the reply ends just before it.
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model='sft', prompt=prompt, stop=[stop],
                                                    max_tokens=SERVE_MAX_NEW, temperature=0,
                                                    stream=True))
            cut = ''.join(c.choices[0].text for c in chunks)
            assert not any(stop in c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            reply = client.completions.create(model='sft', prompt=prompt, stop=[stop],
                                              max_tokens=SERVE_MAX_NEW, temperature=0)
            cut, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert cut == text[:text.index(stop)] and reason == 'stop'


def test_tokenizer_endpoints(sft_server, policy):
    """vLLM's shapes, as lm-eval probes them; only the exact spelling of a special token maps
    to its id."""
    base_url, tok = sft_server, policy.tokenizer
    status, body = post(base_url, '/tokenize', {'prompt': 'Grüße, world', 'add_special_tokens':
                                                False})
    assert status == 200 and body['tokens'] == tok.encode('Grüße, world')
    assert post(base_url, '/tokenize', {'prompt': '<|endoftext|>', 'add_special_tokens':
                                        False})[1]['tokens'] == [tok.eot_id]
    spelled = post(base_url, '/tokenize', {'prompt': 'a <|endoftext|>', 'add_special_tokens':
                                           False})[1]['tokens']
    assert tok.eot_id not in spelled
    assert post(base_url, '/detokenize', {'tokens': body['tokens']})[1] == {'prompt':
                                                                            'Grüße, world'}
    with urllib.request.urlopen(base_url + '/tokenizer_info') as response:
        info = json.loads(response.read())
    assert info['eos_token'] == '<|endoftext|>' and info['model_max_length'] == 96


@pytest.mark.parametrize('path,body,param', [
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'word ' * 200}]},
     'messages'),
    ('/v1/completions', {'prompt': 'hi', 'max_tokens': SERVE_MAX_NEW + 1}, 'max_tokens'),
    ('/v1/completions', {'prompt': 'hi', 'max_tokens': 'ten'}, 'max_tokens'),
    ('/v1/completions', {'prompt': [10 ** 9]}, 'prompt'),
    ('/v1/completions', {'prompt': 'hi', 'tools': [{'type': 'function'}]}, 'tools'),
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}], 'n': 2}, 'n'),
    ('/v1/chat/completions', {'messages': [{'role': 'robot', 'content': 'hi'}]},
     'messages.0.role'),
    ('/v1/chat/completions', {'messages': []}, 'messages'),
    ('/v1/completions', b'{"prompt": "hi",', None),
])
def test_bad_requests_get_a_400_in_openais_shape(sft_server, path, body, param):
    status, reply = post(sft_server, path, body)
    assert status == 400, reply
    assert set(reply['error']) == {'message', 'type', 'param', 'code'}
    assert reply['error']['param'] == param
    assert post(sft_server, '/v1/completions', {'prompt': 'hi', 'max_tokens': 2,
                                               'some_harness_key': 1})[0] == 200


# --- the engine's text streaming, in-process ----------------------------------------------------
class _Row:
    def __init__(self, stop=(), max_tokens=100):
        self.events = []
        self.request = engine_lib.Request(self.events.append)
        self.row = engine_lib.GenerationRow(self.request, 0, [0], SamplingParams(), max_tokens,
                                            stop=tuple(stop))


def stream_text(tokenizer, ids, stop=(), max_tokens=100):
    row = _Row(stop, max_tokens)
    stream = engine_lib._Stream(row.row, tokenizer, stop_ids=set(), ends=set(),
                                skipped=set(tokenizer.special_ids.values()))
    for token in ids:
        if stream.done:
            break
        stream.push(token)
    stream.finish()
    deltas = [e.text for e in row.events if isinstance(e, engine_lib.Delta)]
    return deltas, row.events[-1]


def test_streamed_text_never_splits_a_character(tokenizer):
    text = 'Grüße 日本語 🙂🚀 done'
    ids = tokenizer.encode(text)
    deltas, finished = stream_text(tokenizer, ids)
    assert ''.join(deltas) == text == finished.text
    assert not any(engine_lib.REPLACEMENT_CHARACTER in d for d in deltas)
    assert len(deltas) > 3


def test_stop_strings_cut_the_text_and_are_never_sent(tokenizer):
    text = 'alpha beta END gamma'
    ids = tokenizer.encode(text)
    deltas, finished = stream_text(tokenizer, ids, stop=['END', 'zzz'])
    assert ''.join(deltas) == 'alpha beta ' == finished.text
    assert finished.finish_reason == 'stop'
    assert not any('E' in d for d in deltas)  # a possible start of the stop string is held
    deltas, finished = stream_text(tokenizer, ids, max_tokens=3)
    assert finished.finish_reason == 'length' and len(finished.token_ids) == 3


def test_the_server_exits_cleanly_with_requests_in_flight(sft_workdir):
    """SIGTERM stops taking requests, lets a stream in flight finish, and exits 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, '-m', 'experiments.serve', f'--workdir={sft_workdir}', f'--port={port}',
         f'--max_new_tokens={SERVE_MAX_NEW}'], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ})
    for line in process.stdout:
        if line.startswith('ready:'):
            break
    client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='x', max_retries=0)
    stream = client.completions.create(model='sft', prompt=['def parse('] * 8, temperature=1.0,
                                       max_tokens=SERVE_MAX_NEW, stream=True)
    first = next(iter(stream))
    process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices and [c for c in rest if c.choices and c.choices[0].finish_reason]
    assert process.wait(timeout=60) == 0


class Collect:
    """A request's events; with `cancel`, its client goes away at the first text it gets."""

    def __init__(self, cancel: bool):
        self.events, self.done, self.cancel = [], threading.Event(), cancel
        self.request = engine_lib.Request(self)

    def __call__(self, event):
        self.events.append(event)
        if self.cancel and isinstance(event, engine_lib.Delta):
            self.request.cancelled.set()
        if isinstance(event, engine_lib.Finished):
            self.done.set()


def test_a_cancelled_row_stops_generating(policy):
    """A client that goes away mid-reply cancels its row: the engine's callback stops it at the
    next step, while the same row left alone runs to its limit."""
    engine = engine_lib.Engine(policy, batch_size=8, max_new_tokens=SERVE_MAX_NEW)
    engine.start()
    prompt = render_prompt(policy.tokenizer, chat('Tell me everything.'))
    tokens = {}
    for cancel in (False, True):
        collect = Collect(cancel)
        engine.submit([engine_lib.GenerationRow(collect.request, 0, prompt,
                                                SamplingParams(temperature=0.0), SERVE_MAX_NEW)])
        assert collect.done.wait(120)
        tokens[cancel] = collect.events[-1].token_ids
    engine.stop()
    assert len(tokens[False]) >= 8  # a long reply, so there is something to cut
    assert len(tokens[True]) < len(tokens[False])
    assert tokens[True] == tokens[False][:len(tokens[True])]


def test_the_reward_endpoint_scores_as_the_library_does(reward_workdir, sft_server):
    """`/v1/score` on a reward workdir returns `RewardModel.scorer`'s rewards for the same
    conversations (what best-of-N ranks by); its text endpoints refuse, and a language model's
    server refuses `/v1/score`."""
    from gptstack.lineage import load_reward_model

    questions = ['What is 12 plus 30?', 'Name three colours.', 'Reverse the word "garden".',
                 'Say hello.', 'What is the opposite of cold?']
    replies = ['42', 'red, green, blue', 'nedrag', 'Hello!', 'hot']
    conversations = [[{'role': 'user', 'content': q}, {'role': 'assistant', 'content': r}]
                     for q, r in zip(questions, replies, strict=True)]
    model = load_reward_model(reward_workdir)
    expected = model.scorer(8)([c[:1] for c in conversations], [c[1:] for c in conversations])
    with serving(reward_workdir, '--name=rm') as (base_url, _):
        status, body = post(base_url, '/v1/score', {'conversations': conversations})
        assert status == 200, body
        np.testing.assert_allclose([d['score'] for d in body['data']], expected, atol=1e-5)
        assert [d['index'] for d in body['data']] == list(range(5))
        status, body = post(base_url, '/v1/chat/completions', {'messages': conversations[0]})
        assert status == 400 and 'reward model' in body['error']['message']
        too_long = [[{'role': 'user', 'content': 'word ' * 100}, conversations[0][1]]]
        status, body = post(base_url, '/v1/score', {'conversations': too_long})
        assert status == 400 and body['error']['param'] == 'conversations', body
    status, body = post(sft_server, '/v1/score', {'conversations': conversations})
    assert status == 400 and 'language model' in body['error']['message']


def hostile_requests(tok, n: int, seed: int = 0):
    """`n` requests `(path, body bytes)`: valid skeletons with one field replaced by a wrong
    type, an extreme or a hostile value, and bodies that are not JSON at all."""
    rng = np.random.default_rng(seed)
    junk = [None, True, -1, 0, 10 ** 12, -(10 ** 12), 1.5, float('nan'), float('inf'), 'x', '',
            [], {}, [1, 'a'], {'a': 1}, [[]], [[-5]], [[10 ** 9]], [10 ** 9], ['a', 1],
            '<script>alert(1)</script>', '<|endoftext|>', '<|assistant|><|reward|>',
            'é' * 3000, 'word ' * 500, '\x00\ud7ff', [{'role': 'user'}],
            [{'role': 'user', 'content': 5}], [{'role': 'tool', 'content': 'x'}],
            [{'type': 'image_url', 'image_url': 'x'}]]
    valid_text = ['<|endoftext|> hi', '<b>bold</b> <img src=x onerror=alert(1)>', 'Grüße 🙂',
                  '<|end_of_turn|>', '']
    chat = {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}
    completion = {'prompt': 'hi', 'max_tokens': 4}
    skeletons = [
        ('/v1/chat/completions', chat, ['messages', 'max_tokens', 'temperature', 'top_p', 'stop',
                                        'seed', 'n', 'stream', 'stream_options', 'logprobs',
                                        'max_completion_tokens', 'tools', 'logit_bias']),
        ('/v1/completions', completion, ['prompt', 'max_tokens', 'temperature', 'top_p', 'stop',
                                         'seed', 'echo', 'logprobs', 'stream', 'best_of',
                                         'suffix']),
        ('/tokenize', {'prompt': 'hi'}, ['prompt', 'add_special_tokens']),
        ('/detokenize', {'tokens': [1, 2]}, ['tokens']),
        ('/v1/score', {'conversations': [[{'role': 'user', 'content': 'a'},
                                          {'role': 'assistant', 'content': 'b'}]]},
         ['conversations']),
    ]
    requests = []
    for _ in range(n):
        path, skeleton, fields = skeletons[rng.integers(len(skeletons))]
        kind = rng.integers(4)
        body = dict(skeleton)
        if kind == 0:  # not JSON, or JSON of the wrong shape
            text = json.dumps(skeleton)
            raw = [text[:rng.integers(1, len(text))], '', 'null', '[]', '"text"', '{"a": }',
                   '\xff\xfe'][rng.integers(7)]
            requests.append((path, raw.encode('utf-8', 'surrogatepass')))
            continue
        if kind == 1:  # a hostile but valid text
            key = 'messages' if 'messages' in body else 'prompt'
            text = valid_text[rng.integers(len(valid_text))]
            body[key] = [{'role': 'user', 'content': text}] if key == 'messages' else text
        else:
            body[fields[rng.integers(len(fields))]] = junk[rng.integers(len(junk))]
        requests.append((path, json.dumps(body).encode('utf-8', 'surrogatepass')))
    return requests


def test_three_hundred_hostile_requests_get_no_server_error(sft_server, policy):
    """Every malformed or hostile request gets a 4xx (in OpenAI's shape) or a well-formed
    answer; none gets a 5xx, and the server still answers afterwards."""
    requests = hostile_requests(policy.tokenizer, 320)

    def send(request):
        path, body = request
        http = urllib.request.Request(sft_server + path, data=body,
                                      headers={'Content-Type': 'application/json'})
        try:
            with urllib.request.urlopen(http, timeout=120) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    statuses = [status for status, _ in answers]
    assert not [s for s in statuses if s >= 500], statuses
    for (path, _), (status, body) in zip(requests, answers, strict=True):
        if status == 200 and path.startswith('/v1/') and not body.startswith(b'data:'):
            assert 'choices' in json.loads(body) or 'data' in json.loads(body)
        elif status >= 400:
            error = json.loads(body)['error']
            assert set(error) == {'message', 'type', 'param', 'code'} and error['message']
    assert statuses.count(200) > 30 and len([s for s in statuses if s == 400]) > 100
    with urllib.request.urlopen(sft_server + '/health') as response:
        assert response.status == 200


def test_a_full_queue_refuses_at_once(policy):
    engine = engine_lib.Engine(policy, batch_size=8, max_new_tokens=SERVE_MAX_NEW, max_queue=2)
    request = engine_lib.Request(lambda event: None)
    row = engine_lib.GenerationRow(request, 0, [policy.tokenizer.eot_id], SamplingParams(), 4)
    engine.submit([row, row])
    with pytest.raises(engine_lib.QueueFullError, match='2 rows are waiting'):
        engine.submit([row])
