"""A Hugging Face `tokenizer.json` behind the `Tokenizer` interface, so that a model imported
from a Hugging Face directory (`init_from=hf:DIR`) trains, samples and exports with its own
tokenizer through every stage.

- **The reserved special tokens.** The chat template's role markers, `<|end_of_turn|>`,
  `<|pad|>`, `<|endoftext|>` and the reward token keep the names they have everywhere else. A
  `tokenizer.json` that already has one of them as a special token (GPT-2's and SmolLM2's
  `<|endoftext|>`) keeps its id. The others are added as special tokens after its vocabulary,
  in the order of `SPECIAL_TOKENS`; `added_ids` lists them, and `gptstack.hf.load_hf` gives
  each a new embedding row, the mean of the rows of the tokenizer's own vocabulary.
  The tokenizer saved in the workdir has them, so a later stage finds nothing to add.
- **Injection safety.** `tokenizers` matches special tokens in text unless told otherwise; here
  `encode_special_tokens` is on, so text that spells `<|endoftext|>` is encoded as the
  characters it is made of, as the SentencePiece tokenizer does. Special ids are only ever
  inserted by id.
- **Identity.** `sha256` is over the tokenizer's canonical serialisation (`to_str()`), which
  is what the workdir's `tokenizer.json` holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers

from gptstack.data.sources import DataError
from gptstack.data.tokenizer import END_OF_TURN, PAD, SPECIAL_TOKENS, Tokenizer
from gptstack.environment import first_line
from gptstack.files import write_whole

_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the reserved special tokens (added where missing)."""

    file_name = 'tokenizer.json'

    def __init__(self, json_text: str, where: str = file_name):
        try:
            self.fast = tokenizers.Tokenizer.from_str(json_text)
        except Exception as error:
            raise DataError(f'{where}: not a Hugging Face tokenizer.json '
                            f'({first_line(error)})') from None
        # The ids of the file's own vocabulary; rows of the embedding exist for these.
        self.base_vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        present = {t.content for t in self.fast.get_added_tokens_decoder().values() if t.special}
        self.fast.add_special_tokens([
            tokenizers.AddedToken(token, special=True, normalized=False, single_word=False,
                                  lstrip=False, rstrip=False)
            for token in SPECIAL_TOKENS if token not in present])
        self.fast.encode_special_tokens = True
        special_ids = {token: self.fast.token_to_id(token) for token in SPECIAL_TOKENS}
        super().__init__(special_ids)
        self.added_ids = sorted(i for i in special_ids.values() if i >= self.base_vocab_size)
        self._json = self.fast.to_str()
        self.sha256 = hashlib.sha256(self._json.encode()).hexdigest()
        self._special = {i for i, t in self.fast.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        try:
            text = pathlib.Path(path).read_text(encoding='utf-8')
        except FileNotFoundError:
            raise DataError(f'{path}: missing (a Hugging Face model directory needs its fast '
                            'tokenizer, tokenizer.json)') from None
        except UnicodeDecodeError as error:
            raise DataError(f'{path}: not UTF-8 text ({error})') from None
        return cls(text, str(path))

    def save(self, path: str | os.PathLike) -> None:
        write_whole(path, self._json)

    @property
    def vocab_size(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.fast.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.fast.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self.fast.id_to_token(token_id)

    def token_bytes(self) -> np.ndarray:
        """Bytes per token: in a byte-level BPE (GPT-2's) each character of a token stands for
        one byte; otherwise `<0xNN>` pieces are one byte and others are their text with `▁` as
        a space."""
        byte_level = 'ByteLevel' in _types(json.loads(self._json).get('decoder'))
        table = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            token = self.fast.id_to_token(i)
            if token is None or i in self._special:
                continue
            if byte_level:
                table[i] = len(token)
            elif _BYTE_PIECE.fullmatch(token):
                table[i] = 1
            else:
                table[i] = len(token.replace('\u2581', ' ').encode())
        return table


def _types(component) -> set[str]:
    """The `type`s of a tokenizer.json component and of the parts of a `Sequence` one."""
    if not isinstance(component, dict):
        return set()
    parts = component.get('decoders') or component.get('pretokenizers') or []
    return {component.get('type'), *(t for part in parts for t in _types(part))}


# The chat template of `gptstack.data.tokenizer.render_chat` in the Jinja form that
# transformers' `apply_chat_template` reads (the role markers are the roles' names).
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def write_tokenizer_files(directory: str | os.PathLike, tokenizer: Tokenizer,
                          max_length: int) -> list[str]:
    """The tokenizer's files in a Hugging Face model directory; returns their names.

    A `tokenizer.json` lineage writes it with `tokenizer_config.json` (the chat template, the
    end-of-turn, padding and end-of-text tokens), which transformers' `AutoTokenizer` reads. A
    SentencePiece lineage writes its `tokenizer.model` with the same `tokenizer_config.json`;
    `sentencepiece` and `gptstack.data.tokenizer` read it (no `tokenizer.json` is derived).
    """
    directory = pathlib.Path(directory)
    tokenizer.save(directory / tokenizer.file_name)
    config = {'chat_template': CHAT_TEMPLATE, 'eos_token': END_OF_TURN, 'pad_token': PAD,
              'bos_token': None, 'model_max_length': max_length, 'add_bos_token': False,
              'add_eos_token': False, 'clean_up_tokenization_spaces': False}
    if isinstance(tokenizer, HFTokenizer):
        config['tokenizer_class'] = 'PreTrainedTokenizerFast'
    write_whole(directory / 'tokenizer_config.json', json.dumps(config, indent=2) + '\n')
    return [tokenizer.file_name, 'tokenizer_config.json']
