"""The HTTP side of the server: OpenAI's API as its clients call it, over an `Engine`.

- `POST /v1/chat/completions`: messages (system, user, assistant) rendered with the chat
  template; `POST /v1/completions`: prompts as text or token ids, one or a list. Both stream as
  server-sent events when asked, ending in `data: [DONE]`.
- `POST /v1/completions` with `echo` and `logprobs` and `max_tokens` 0 or 1 scores the prompt
  in one forward pass: how evaluation harnesses read a continuation's log-likelihood.
- `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info` in the shapes vLLM established,
  so a client needs no tokenizer of its own; `GET /v1/models`, `GET /health`, and a chat page
  at `GET /` (`chat.html`: one static file, nothing fetched from elsewhere).
- Every prompt is read as a new document, after an implicit `<|endoftext|>`, as every
  pretraining document starts; echoed log-probabilities are those of the given tokens only.
- Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
  request (naming the field), 503 with `Retry-After` when the queue is full. Parameters that are
  known but not implemented are refused by name; unknown extra keys are ignored and logged.

Handlers never call JAX: they validate, queue rows with the engine and wait for its events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptstack.data.preference import completion_row
from gptstack.data.tokenizer import SPECIAL_TOKENS, render_prompt
from gptstack.sampling import SamplingParams
from gptstack.serving import engine as engine_lib
from gptstack.serving.engine import (
    Delta,
    Engine,
    Failed,
    Finished,
    GenerationRow,
    QueueFullError,
    RewardRow,
    ScoringRow,
)

log = logging.getLogger(__name__)
CHAT_PAGE = pathlib.Path(__file__).with_name('chat.html')  # the web chat page, one static file
MAX_STOP_STRINGS = 16
# Known parameters this server does not implement, with the values that mean "not used".
UNSUPPORTED = {'tools': (None, []), 'tool_choice': (None, 'none'), 'functions': (None, []),
               'function_call': (None, 'none'), 'logit_bias': (None, {}), 'suffix': (None, ''),
               'best_of': (None, 1), 'presence_penalty': (None, 0, 0.0),
               'frequency_penalty': (None, 0, 0.0), 'response_format': (None, {'type': 'text'}),
               'audio': (None,), 'modalities': (None, ['text']), 'prediction': (None,),
               'parallel_tool_calls': (None, False, True), 'top_logprobs': (None, 0)}


class BadRequestError(Exception):
    """A request this server will not run: `message` says why, `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# --- requests -----------------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields every generation request shares. `null` means the default, as OpenAI reads it."""

    model_config = ConfigDict(extra='allow')

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool | None = None
    stream_options: _StreamOptions | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra='allow')
    include_usage: StrictBool | None = None


class _TextPart(BaseModel):
    type: Literal['text']
    text: StrictStr


class _Message(BaseModel):
    model_config = ConfigDict(extra='allow')
    role: Literal['system', 'developer', 'user', 'assistant']
    content: StrictStr | list[_TextPart]


class ChatRequest(_Body):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: StrictBool | None = None


class CompletionRequest(_Body):
    prompt: (StrictStr | Annotated[list[StrictInt], Field(min_length=1)]
             | Annotated[list[StrictStr], Field(min_length=1)]
             | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]],
                         Field(min_length=1)])
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=engine_lib.MAX_TOP_LOGPROBS)] | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra='allow')
    model: StrictStr | None = None
    conversations: Annotated[list[Annotated[list[_Message], Field(min_length=2)]],
                             Field(min_length=1)]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra='allow')
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra='allow')
    tokens: list[StrictInt]


_Body.model_rebuild()


# --- the app ------------------------------------------------------------------------------------
class _Events:
    """Where the engine thread sends one request's events: this event loop's queue."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = engine_lib.Request(self.emit)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def create_app(engine: Engine, model_name: str, about: dict) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`; `about` (stage, step,
    parameters, ...) is shown by `/v1/models` and the chat page."""
    app = FastAPI(title='gptstack', docs_url=None, redoc_url=None, openapi_url=None)
    tok = engine.tokenizer
    special = {name: tok.special_ids[name] for name in SPECIAL_TOKENS}
    created = int(time.time())

    # --- errors ------------------------------------------------------------------------------
    @app.exception_handler(BadRequestError)
    async def bad_request(_, error: BadRequestError):
        return _error(400, str(error), error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        where = '.'.join(str(p) for p in first.get('loc', ())[1:] if not _is_type_tag(p))
        if first.get('type') == 'json_invalid':
            return _error(400, f'the body is not valid JSON: {first.get("msg")}', None)
        return _error(400, f'{where or "body"}: {first.get("msg")}', where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), None)

    @app.exception_handler(Exception)
    async def failure(_, error: Exception):
        log.exception('request failed')
        return _error(500, f'{type(error).__name__}: {error}', None)

    @app.exception_handler(QueueFullError)
    async def queue_full(_, error: QueueFullError):
        return _error(503, str(error), None, headers={'Retry-After': '1'},
                      kind='server_overloaded')

    # --- information -------------------------------------------------------------------------
    @app.get('/health')
    async def health():
        return {'status': 'ok', 'queued': engine.queued}

    @app.get('/v1/models')
    async def models():
        return {'object': 'list', 'data': [{'id': model_name, 'object': 'model',
                                            'created': created, 'owned_by': 'gptstack',
                                            'max_model_len': engine.context,
                                            'max_new_tokens': engine.max_new_tokens, **about}]}

    @app.get('/', response_class=HTMLResponse)
    async def chat_page():
        return CHAT_PAGE.read_text(encoding='utf-8')

    @app.get('/tokenizer_info')
    async def tokenizer_info():
        return {'eos_token': '<|endoftext|>', 'bos_token': '<|endoftext|>',
                'pad_token': '<|pad|>', 'special_tokens': special,
                'vocab_size': tok.vocab_size, 'model_max_length': engine.context,
                'tokenizer_class': type(tok).__name__}

    @app.post('/tokenize')
    async def tokenize(body: TokenizeRequest):
        # Only the exact spelling of a special token names it; in any other text it is text.
        ids = [special[body.prompt]] if body.prompt in special else tok.encode(body.prompt)
        if body.add_special_tokens:
            ids = [tok.eot_id, *ids]
        return {'tokens': ids, 'count': len(ids), 'max_model_len': engine.context}

    @app.post('/detokenize')
    async def detokenize(body: DetokenizeRequest):
        _check_ids(body.tokens, tok.vocab_size, 'tokens')
        return {'prompt': tok.decode(body.tokens)}

    def needs_language_model() -> None:
        if not engine.generates:
            raise BadRequestError(f'{model_name} is a reward model: it generates no text; '
                                  'score conversations with POST /v1/score')

    # --- rewards -----------------------------------------------------------------------------
    @app.post('/v1/score')
    async def score(body: ScoreRequest):
        if engine.generates:
            raise BadRequestError(f'{model_name} is a language model: /v1/score needs a '
                                  'reward-model workdir', 'conversations')
        events, rows = _Events(), []
        for i, conversation in enumerate(body.conversations):
            messages = _messages(conversation)
            if messages[-1]['role'] != 'assistant':
                raise BadRequestError(f'conversations.{i}: the last message is the reply to '
                                      'score, so its role must be assistant', 'conversations')
            prompt, completion = messages[:-1], messages[-1:]
            n = len(completion_row(tok, prompt, completion))
            if n > engine.reward_row_tokens:
                raise BadRequestError(f'conversations.{i} is {n} tokens with the reward token; '
                                      f'the reward model reads at most '
                                      f'{engine.reward_row_tokens}', 'conversations')
            rows.append(RewardRow(events.request, i, prompt, completion))
        engine.submit(rows)
        finished = await _wait(events, len(rows))
        return {'object': 'list', 'model': model_name,
                'data': [{'object': 'score', 'index': f.index, 'score': f.reward}
                         for f in finished]}

    # --- generation --------------------------------------------------------------------------
    @app.post('/v1/chat/completions')
    async def chat_completions(body: ChatRequest):
        needs_language_model()
        _refuse_unsupported(body, extra_refused=('logprobs',) if body.logprobs else ())
        messages = _messages(body.messages)
        prompt = render_prompt(tok, messages)
        max_tokens = _max_tokens(engine, body.max_completion_tokens
                                 if body.max_completion_tokens is not None else body.max_tokens)
        _check_prompt(engine, prompt, 'messages')
        events = _Events()
        row = GenerationRow(events.request, 0, prompt, _sampling(body), max_tokens, body.seed,
                            _stops(body.stop), chat=True)
        engine.submit([row])
        ids = _ids('chatcmpl')
        if body.stream:
            return _sse(_chat_chunks(events, ids, model_name, len(prompt), body), events)
        finished = await _wait(events, 1)
        reply = finished[0]
        return {**ids, 'object': 'chat.completion', 'model': model_name,
                'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': reply.text},
                             'logprobs': None, 'finish_reason': reply.finish_reason}],
                'usage': _usage(len(prompt), len(reply.token_ids))}

    @app.post('/v1/completions')
    async def completions(body: CompletionRequest):
        needs_language_model()
        _refuse_unsupported(body)
        if body.stream and body.logprobs is not None:
            raise BadRequestError('logprobs are not streamed: ask without stream', 'logprobs')
        prompts = _prompts(tok, body.prompt)
        scoring = body.echo and body.logprobs is not None and (body.max_tokens or 0) <= 1
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        events = _Events()
        rows = []
        for i, prompt in enumerate(prompts):
            if scoring:
                _check_ids(prompt, tok.vocab_size, 'prompt')
                # The one token generated after the prompt takes no position of its own.
                if 1 + len(prompt) > engine.context:
                    raise BadRequestError(
                        f'prompt {i} is {len(prompt)} tokens; scoring takes at most '
                        f'{engine.context - 1} (the context, {engine.context}, less '
                        '<|endoftext|> before it)', 'prompt')
                rows.append(ScoringRow(events.request, i, prompt, body.logprobs,
                                       generate=max_tokens == 1,
                                       temperature=_sampling(body).temperature,
                                       seed=body.seed))
            else:
                ids = [tok.eot_id, *prompt]
                _check_ids(prompt, tok.vocab_size, 'prompt')
                _check_prompt(engine, ids, 'prompt', index=i)
                rows.append(GenerationRow(
                    events.request, i, ids, _sampling(body), _max_tokens(engine, max_tokens),
                    body.seed, _stops(body.stop), logprobs=body.logprobs, echo=bool(body.echo)))
        engine.submit(rows)
        ids = _ids('cmpl')
        prompt_tokens = sum(1 + len(p) for p in prompts)
        echoes = [tok.decode(p) if body.echo else '' for p in prompts]
        if body.stream:
            return _sse(_completion_chunks(events, ids, model_name, prompt_tokens, echoes,
                                           body), events)
        finished = await _wait(events, len(rows))
        return {**ids, 'object': 'text_completion', 'model': model_name,
                'choices': [{'index': f.index, 'text': echoes[f.index] + f.text,
                             'logprobs': f.logprobs, 'finish_reason': f.finish_reason}
                            for f in finished],
                'usage': _usage(prompt_tokens, sum(len(f.token_ids) for f in finished))}

    return app


# --- helpers ------------------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None, headers: dict | None = None,
           kind: str | None = None) -> JSONResponse:
    kind = kind or ('invalid_request_error' if status < 500 else 'server_error')
    return JSONResponse({'error': {'message': message, 'type': kind, 'param': param,
                                   'code': status}}, status_code=status, headers=headers)


def _is_type_tag(part) -> bool:
    """Pydantic's names of union members in an error location (`str`, `list[int]`)."""
    return isinstance(part, str) and (part.startswith(('list[', 'str', 'int', 'function-'))
                                      or part in ('StrictStr', 'StrictInt'))


def _refuse_unsupported(body: _Body, extra_refused: Sequence[str] = ()) -> None:
    extras = dict(body.model_extra or {})
    for name, neutral in UNSUPPORTED.items():
        if name in extras and extras.pop(name) not in neutral:
            raise BadRequestError(f'{name} is not supported by this server', name)
    for name in extra_refused:
        raise BadRequestError(f'{name} is not supported by this server for this endpoint', name)
    if body.n not in (None, 1):
        raise BadRequestError(f'n={body.n}: this server returns one choice per prompt', 'n')
    if extras:
        log.info('ignored request fields: %s', ', '.join(sorted(extras)))


def _messages(messages: Sequence[_Message]) -> list[dict]:
    """Messages as the chat template takes them (`developer` is OpenAI's newer `system`)."""
    return [{'role': 'system' if m.role == 'developer' else m.role,
             'content': m.content if isinstance(m.content, str)
             else ''.join(part.text for part in m.content)} for m in messages]


def _sampling(body: _Body) -> SamplingParams:
    return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequestError(f'stop: {len(stops)} strings; at most {MAX_STOP_STRINGS}', 'stop')
    return tuple(s for s in stops if s)


def _max_tokens(engine: Engine, requested: int | None) -> int:
    if requested is None:
        return engine.max_new_tokens
    if requested > engine.max_new_tokens:
        raise BadRequestError(f'max_tokens={requested}: this server generates at most '
                         f'{engine.max_new_tokens} tokens per reply', 'max_tokens')
    return requested


def _check_prompt(engine: Engine, ids: Sequence[int], param: str, index: int = 0) -> None:
    if len(ids) > engine.max_prompt_tokens:
        which = f'prompt {index}' if param == 'prompt' else 'the rendered conversation'
        raise BadRequestError(f'{which} is {len(ids)} tokens with <|endoftext|> before it; this '
                         f'server generates after at most {engine.max_prompt_tokens} (the '
                         f'context, {engine.context}, less the {engine.max_new_tokens} new '
                         'tokens a reply may take)', param)


def _check_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise BadRequestError(f'{param}: token id {bad[0]} is outside the vocabulary '
                         f'[0, {vocab_size})', param)


def _prompts(tok, prompt) -> list[list[int]]:
    """The prompt field as a list of token-id prompts."""
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _ids(prefix: str) -> dict:
    return {'id': f'{prefix}-{uuid.uuid4().hex}', 'created': int(time.time())}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}


async def _wait(events: _Events, n: int) -> list[Finished]:
    """The `n` rows' results, by index; the rows are cancelled if the client goes away."""
    finished: dict[int, Finished] = {}
    try:
        while len(finished) < n:
            event = await events.queue.get()
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            if isinstance(event, Finished):
                finished[event.index] = event
    finally:
        events.request.cancelled.set()
    return [finished[i] for i in sorted(finished)]


def _sse(chunks: AsyncIterator[dict | str], events: _Events) -> StreamingResponse:
    """Server-sent events of `chunks`; when the client goes away (the response is cancelled),
    its rows are cancelled and the engine stops generating them."""
    async def lines():
        try:
            async for chunk in chunks:
                data = chunk if isinstance(chunk, str) else json.dumps(chunk)
                yield f'data: {data}\n\n'
        finally:
            events.request.cancelled.set()
    return StreamingResponse(lines(), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})


async def _stream_events(events: _Events, n: int) -> AsyncIterator:
    """The engine's events until all `n` rows finish; a failure becomes an error chunk (how
    a stream reports an error after its 200). Text that arrived while the previous chunk was
    being sent goes out as one chunk per row: under load, fewer and larger chunks."""
    done = 0
    while done < n:
        pending = [await events.queue.get()]
        while not events.queue.empty():
            pending.append(events.queue.get_nowait())
        for event in _merged_deltas(pending):
            if isinstance(event, Failed):
                yield {'error': {'message': event.message, 'type': 'server_error',
                                 'param': None, 'code': 500}}
                return
            done += isinstance(event, Finished)
            yield event


def _merged_deltas(events: list) -> list:
    """`events` in order, with consecutive text of the same row joined into one `Delta`."""
    merged = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, Delta) and isinstance(last, Delta) and last.index == event.index:
            merged[-1] = Delta(event.index, last.text + event.text)
        else:
            merged.append(event)
    return merged


async def _chat_chunks(events: _Events, ids: dict, model: str, prompt_tokens: int,
                       body: ChatRequest) -> AsyncIterator[dict | str]:
    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {**ids, 'object': 'chat.completion.chunk', 'model': model,
                'choices': [{'index': 0, 'delta': delta, 'logprobs': None,
                             'finish_reason': finish_reason}]}

    yield chunk({'role': 'assistant', 'content': ''})
    async for event in _stream_events(events, 1):
        if isinstance(event, dict):
            yield event
            return
        if isinstance(event, Delta):
            yield chunk({'content': event.text})
        elif isinstance(event, Finished):
            yield chunk({}, event.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield {**ids, 'object': 'chat.completion.chunk', 'model': model, 'choices': [],
                       'usage': _usage(prompt_tokens, len(event.token_ids))}
    yield '[DONE]'


async def _completion_chunks(events: _Events, ids: dict, model: str, prompt_tokens: int,
                             echoes: list[str], body: CompletionRequest
                             ) -> AsyncIterator[dict | str]:
    def chunk(index: int, text: str, finish_reason: str | None = None) -> dict:
        return {**ids, 'object': 'text_completion', 'model': model,
                'choices': [{'index': index, 'text': text, 'logprobs': None,
                             'finish_reason': finish_reason}]}

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk(index, echo)
    completion_tokens = 0
    async for event in _stream_events(events, len(echoes)):
        if isinstance(event, dict):
            yield event
            return
        if isinstance(event, Delta):
            yield chunk(event.index, event.text)
        elif isinstance(event, Finished):
            completion_tokens += len(event.token_ids)
            yield chunk(event.index, '', event.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield {**ids, 'object': 'text_completion', 'model': model, 'choices': [],
               'usage': _usage(prompt_tokens, completion_tokens)}
    yield '[DONE]'
