"""Tokenizers: the interface every stage uses, the SentencePiece BPE this repository trains
(byte fallback, reserved special tokens), and the chat template that every later stage renders
conversations with. A Hugging Face `tokenizer.json` is the interface's other implementation
(`gptstack.data.hf_tokenizer`), so a model imported from there runs through the same stages.

- Exact round trip of any UTF-8 text: identity normalisation, no dummy prefix, whitespace kept,
  byte fallback for characters outside the vocabulary (so no unknown tokens), and `'\\n'` as a
  piece of its own (training is line by line, so BPE never sees a newline).
- Special tokens are SentencePiece *control* symbols: they have reserved ids but are never
  matched in text, so text that spells `<|reward|>` encodes as ordinary characters. They are only
  ever inserted by id.
- `Tokenizer.sha256` identifies the tokenizer; later stages compare it with the one their
  checkpoint was trained with.
- Chat template (one line per turn, no newlines added):
  `<|endoftext|><|system|>...<|end_of_turn|><|user|>...<|end_of_turn|><|assistant|>...<|end_of_turn|>`
  The assistant mask covers assistant content and its `<|end_of_turn|>`, nothing else.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import sentencepiece as spm

from gptstack.config import ConfigError
from gptstack.data.sources import DataError
from gptstack.files import write_whole

EOT = '<|endoftext|>'
PAD = '<|pad|>'
SYSTEM = '<|system|>'
USER = '<|user|>'
ASSISTANT = '<|assistant|>'
END_OF_TURN = '<|end_of_turn|>'
REWARD = '<|reward|>'
SPECIAL_TOKENS = (EOT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, REWARD)
ROLES = {'system': SYSTEM, 'user': USER, 'assistant': ASSISTANT}


class Tokenizer(abc.ABC):
    """What every stage needs of a tokenizer: text to ids and back without ever producing a
    special id from text, the ids of the reserved special tokens, bytes per token (for
    bits-per-byte) and a file in the workdir that identifies it (`sha256`).

    `Tokenizer.load(path)` reads either kind: a `.json` file is a Hugging Face tokenizer, any
    other a SentencePiece model.
    """

    file_name: str  # its name in a stage workdir
    sha256: str

    def __init__(self, special_ids: Mapping[str, int]):
        self.special_ids = dict(special_ids)
        self.eot_id = self.special_ids[EOT]
        self.pad_id = self.special_ids[PAD]
        self.end_of_turn_id = self.special_ids[END_OF_TURN]
        self.reward_id = self.special_ids[REWARD]
        self.role_ids = {role: self.special_ids[token] for role, token in ROLES.items()}

    @staticmethod
    def load(path: str | os.PathLike) -> Tokenizer:
        """The tokenizer saved at `path`.

        Raises:
            DataError: when the file is not a tokenizer (damaged or cut short), or lacks the
                reserved special tokens.
        """
        if str(path).endswith('.json'):
            from gptstack.data.hf_tokenizer import HFTokenizer  # needs the `tokenizers` package
            return HFTokenizer.load(path)
        return SentencePieceTokenizer.load(path)

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Ids in use, special tokens included (the model's embedding may have more rows)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never produces a special id."""
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are shown by name (encode never produces them)."""

    @abc.abstractmethod
    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, as the tokenizer spells it."""

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """`[V]` int32: UTF-8 bytes each token stands for (0 for special tokens), for
        bits-per-byte."""


# SentencePiece shows spaces as U+2581; a literal U+2581 in the text would decode as a space, so
# it is encoded through its UTF-8 byte pieces instead.
_SPACE_MARK = '\u2581'


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model plus the ids of the reserved special tokens."""

    file_name = 'tokenizer.model'

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()
        special_ids = {}
        for token in SPECIAL_TOKENS:
            token_id = self.sp.piece_to_id(token)
            if not self.sp.is_control(token_id):
                raise ValueError(f'tokenizer model lacks the reserved special token {token!r}; '
                                 'it was not trained by gptstack.data.tokenizer.train_tokenizer')
            special_ids[token] = token_id
        super().__init__(special_ids)
        self._space_mark_ids = [self.sp.piece_to_id(f'<0x{b:02X}>')
                                for b in _SPACE_MARK.encode()]

    # --- files ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        with open(path, 'rb') as f:
            proto = f.read()
        try:
            return cls(proto)
        except RuntimeError:  # sentencepiece cannot parse it
            raise DataError(f'{path}: not a SentencePiece model ({len(proto):,} bytes; damaged '
                            'or cut short?)') from None
        except ValueError as error:  # a model without the reserved tokens
            raise DataError(f'{path}: {error}') from None

    def save(self, path: str | os.PathLike) -> None:
        write_whole(path, self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    # --- text <-> ids ---------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        ids = self.sp.encode(list(texts), out_type=int, num_threads=num_threads)
        for i, text in enumerate(texts):
            if _SPACE_MARK in text:
                parts = self.sp.encode(text.split(_SPACE_MARK), out_type=int)
                ids[i] = [t for part in _interleave(parts, self._space_mark_ids) for t in part]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for token_id in map(int, ids):
            if self.sp.is_control(token_id):
                out.append(self.sp.decode(run) + self.sp.id_to_piece(token_id))
                run = []
            else:
                run.append(token_id)
        return ''.join(out) + self.sp.decode(run)

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                table[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                table[i] = len(self.sp.id_to_piece(i).replace(_SPACE_MARK, ' ').encode())
        return table


def _interleave(parts, separator):
    for i, part in enumerate(parts):
        if i:
            yield separator
        yield part


def train_tokenizer(documents: Iterable[str], vocab_size: int, *, max_lines: int = 500_000,
                    seed: int = 0) -> SentencePieceTokenizer:
    """Trains a SentencePiece BPE on the lines of `documents`.

    Args:
        documents: texts to learn merges from (read once).
        vocab_size: total vocabulary including the special tokens and the 256 byte pieces.
        max_lines: lines sampled (without replacement, by `seed`) for training.
    """
    lines = [line for doc in documents for line in doc.split('\n') if line.strip()]
    if not lines:
        raise ValueError('tokenizer training: the documents contain no non-empty lines')
    if len(lines) > max_lines:
        lines = random.Random(seed).sample(lines, max_lines)
    model = io.BytesIO()
    try:
        _train(lines, model, vocab_size)
    except RuntimeError as error:  # sentencepiece's checks, as one line with the bound
        bound = _VOCAB_BOUND.search(str(error))
        if not bound:
            raise
        least = bound['kind'] == 'smaller'
        raise ConfigError(
            f'tokenizer vocab_size={vocab_size}: this corpus allows '
            f'{"at least" if least else "at most"} {bound["bound"] or bound["high"]} (the '
            f'{len(SPECIAL_TOKENS)} special tokens, byte pieces, its characters and the merges '
            'its text has)') from None
    return SentencePieceTokenizer(model.getvalue())


_VOCAB_BOUND = re.compile(r'Vocabulary size (?:is (?P<kind>smaller) than required_chars\. '
                          r'\d+ vs (?P<bound>\d+)|too high \(\d+\)\. Please set it to a value '
                          r'<= (?P<high>\d+))')


def _train(lines: list[str], model: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type='bpe',
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
        control_symbols=list(SPECIAL_TOKENS), user_defined_symbols=['\n'],
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        # Keep text exactly as written: code and chat depend on whitespace.
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)


# --- the chat template --------------------------------------------------------------------------
def render_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a same-length mask that is 1 on assistant tokens.

    The mask covers each assistant turn's content and its closing `<|end_of_turn|>`; the role
    markers, system and user turns and the leading `<|endoftext|>` are 0.
    """
    ids, mask = [tokenizer.eot_id], [0]
    for message in messages:
        if message.get('role') not in ROLES:
            raise ValueError(f'chat message role {message.get("role")!r}: expected one of '
                             f'{sorted(ROLES)}')
        content = tokenizer.encode(message['content'])
        is_assistant = int(message['role'] == 'assistant')
        ids += [tokenizer.role_ids[message['role']], *content, tokenizer.end_of_turn_id]
        mask += [0] + [is_assistant] * (len(content) + 1)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The conversation so far followed by `<|assistant|>`: what generation continues from."""
    return render_chat(tokenizer, messages)[0] + [tokenizer.role_ids['assistant']]


def parse_chat(tokenizer: Tokenizer, ids: Iterable[int]) -> list[dict]:
    """Turns of a rendered or generated conversation.

    Each turn is `{'role', 'content', 'complete'}`; `complete` is False for a final turn that
    has no `<|end_of_turn|>` (generation stopped by the length limit). Tokens outside any turn
    and `<|endoftext|>`/`<|pad|>` are ignored.
    """
    roles = {token_id: role for role, token_id in tokenizer.role_ids.items()}
    turns, role, content = [], None, []
    for token_id in map(int, ids):
        if token_id in roles:
            if role is not None:
                turns.append(dict(role=role, content=tokenizer.decode(content), complete=False))
            role, content = roles[token_id], []
        elif token_id == tokenizer.end_of_turn_id:
            if role is not None:
                turns.append(dict(role=role, content=tokenizer.decode(content), complete=True))
            role, content = None, []
        elif role is not None and token_id not in (tokenizer.eot_id, tokenizer.pad_id):
            content.append(token_id)
    if role is not None:
        turns.append(dict(role=role, content=tokenizer.decode(content), complete=False))
    return turns
