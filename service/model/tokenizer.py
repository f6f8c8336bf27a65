"""Tokenizers shared by training and serving.

Three kinds, all with the same special ids so the model and the engine never
need to ask which kind they have:

    0 <pad>   1 <s>   2 </s>   3 <unk>

* ``char``: every character is a token (each Han character too).
* ``word``: words and punctuation marks, split on white space and punctuation.
* ``jieba``: Chinese words as jieba segments them (its own dictionary, the same
  at training and serving; the file records which). A word the vocabulary lacks
  is spelled by its characters, so every character seen in training stays known.
* ``sentencepiece``: a SentencePiece model (unigram), which also segments text
  written without spaces.

A tokenizer serialises to bytes (``to_bytes``) so an exported artifact can
carry it; ``load_tokenizer(data)`` is the inverse. Building a tokenizer
from a corpus lives in ``training/vocabulary.py``; this module only needs the
standard library and sentencepiece.
"""

from __future__ import annotations

import json
import re

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# A word: letters/digits with inner apostrophes ("don't", "lord's"); anything
# else that is not white space is a one-character punctuation token.
WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
# Punctuation that attaches to the word before it when word tokens are joined.
_NO_SPACE_BEFORE = set(",.;:!?)]}'’”%…、，。！？；：」』）》")
_NO_SPACE_AFTER = set("([{‘“「『（《")


class Tokenizer:
    """Common interface. ``token_text(i)`` is what token i adds to the text."""

    kind: str = ""

    def __init__(self, lowercase: bool = False) -> None:
        self.lowercase = lowercase

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def normalize(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return "".join(self.token_text(i) for i in ids if i >= len(SPECIAL_TOKENS))

    def token_text(self, token_id: int) -> str:
        raise NotImplementedError

    def display_text(self, token_id: int) -> str:
        """What token i adds to the text shown to people (see WordTokenizer: written forms)."""
        return self.token_text(token_id)

    def to_bytes(self) -> bytes:
        raise NotImplementedError


class VocabTokenizer(Tokenizer):
    """A fixed list of token strings; ids are positions in the list."""

    def __init__(self, tokens: list[str], lowercase: bool = False, written: list[str] | None = None) -> None:
        super().__init__(lowercase)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        if written is not None and len(written) != len(tokens):
            raise ValueError(f"{len(written)} written forms for {len(tokens)} tokens")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        # each token as people write it, most often, in the training text ("lord" -> "LORD"); None: as is
        self.written = list(written) if written is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def to_bytes(self) -> bytes:
        payload = {"kind": self.kind, "lowercase": self.lowercase, "tokens": self.tokens}
        if self.written is not None:
            payload["written"] = self.written
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")


class CharTokenizer(VocabTokenizer):
    kind = "char"

    def encode(self, text: str) -> list[int]:
        get = self.index.get
        return [get(ch, UNK) for ch in self.normalize(text)]

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id] if token_id >= len(SPECIAL_TOKENS) else ""


class WordTokenizer(VocabTokenizer):
    kind = "word"

    @staticmethod
    def split(text: str) -> list[str]:
        return WORD_PATTERN.findall(text)

    def encode(self, text: str) -> list[int]:
        get = self.index.get
        return [get(w, UNK) for w in self.split(self.normalize(text))]

    @staticmethod
    def joined(word: str, previous: str | None) -> str:
        """The text ``word`` adds after the token ``previous`` ("": at the start; None: after a word).
        A space goes between words, not before closing punctuation or after opening punctuation."""
        if previous == "" or word in _NO_SPACE_BEFORE or (previous is not None and previous in _NO_SPACE_AFTER):
            return word
        return " " + word

    def token_text(self, token_id: int) -> str:
        # Words come with a leading space; the engine strips it where needed.
        return self.joined(self.tokens[token_id], None) if token_id >= len(SPECIAL_TOKENS) else ""

    def display_text(self, token_id: int) -> str:
        if self.written is None or token_id < len(SPECIAL_TOKENS):
            return self.token_text(token_id)
        return self.joined(self.written[token_id], None)

    def decode(self, ids: list[int]) -> str:
        out, previous = [], ""
        for i in ids:
            if i >= len(SPECIAL_TOKENS):
                out.append(self.joined(self.tokens[i], previous))
                previous = self.tokens[i]
        return "".join(out)


class JiebaTokenizer(VocabTokenizer):
    kind = "jieba"

    def __init__(
        self, tokens: list[str], lowercase: bool = False, written: list[str] | None = None, dictionary: str = ""
    ) -> None:
        super().__init__(tokens, lowercase, written)
        installed = jieba_dictionary()
        if dictionary and dictionary != installed:
            raise ValueError(
                f"this model's words were segmented with {dictionary}; the installed jieba has {installed} "
                "(install the jieba version in constraints.txt)"
            )
        self.dictionary = installed

    @staticmethod
    def segment(text: str) -> list[str]:
        return _jieba().lcut(text, HMM=False)

    def encode(self, text: str) -> list[int]:
        get, out = self.index.get, []
        for word in self.segment(self.normalize(text)):
            found = get(word)
            if found is not None:
                out.append(found)
            else:
                out.extend(get(ch, UNK) for ch in word)
        return out

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id] if token_id >= len(SPECIAL_TOKENS) else ""

    def to_bytes(self) -> bytes:
        payload = json.loads(super().to_bytes())
        payload["dictionary"] = self.dictionary
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")


_segmenter = None


def _jieba():
    """jieba's default segmenter, loaded once and quietly (it logs its dictionary loading)."""
    global _segmenter
    if _segmenter is None:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.dt.initialize()
        _segmenter = jieba.dt
    return _segmenter


def jieba_dictionary() -> str:
    """Which segmentation the installed jieba gives: its version and its dictionary's checksum."""
    import hashlib

    import jieba

    with jieba.dt.get_dict_file() as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:16]
    return f"jieba {jieba.__version__} dict.txt sha256:{digest}"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, lowercase: bool = False) -> None:
        super().__init__(lowercase)
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        size = self.processor.get_piece_size()
        ids = (self.processor.pad_id(), self.processor.bos_id(), self.processor.eos_id(), self.processor.unk_id())
        if ids != (PAD, BOS, EOS, UNK):
            raise ValueError(f"sentencepiece model has special ids {ids}, expected {(PAD, BOS, EOS, UNK)}")
        # Surface text of each piece: the word-boundary mark becomes a space.
        self._texts = [
            "" if i < len(SPECIAL_TOKENS) else self.processor.id_to_piece(i).replace("\u2581", " ") for i in range(size)
        ]

    @property
    def vocab_size(self) -> int:
        return len(self._texts)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(self.normalize(text))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([i for i in ids if i >= len(SPECIAL_TOKENS)])

    def token_text(self, token_id: int) -> str:
        return self._texts[token_id]

    def to_bytes(self) -> bytes:
        header = json.dumps({"kind": self.kind, "lowercase": self.lowercase}).encode("utf-8")
        return header + b"\n" + self.model_bytes


def load_tokenizer(data: bytes) -> Tokenizer:
    """Rebuild a tokenizer from ``Tokenizer.to_bytes()`` output."""
    if data.startswith(b'{"kind": "sentencepiece"'):
        header, _, model = data.partition(b"\n")
        meta = json.loads(header)
        return SentencePieceTokenizer(model, lowercase=meta["lowercase"])
    meta = json.loads(data.decode("utf-8"))
    if meta.get("kind") == "jieba":
        return JiebaTokenizer(meta["tokens"], meta["lowercase"], meta.get("written"), meta.get("dictionary", ""))
    cls = {"char": CharTokenizer, "word": WordTokenizer}.get(meta.get("kind"))
    if cls is None:
        raise ValueError(f"unknown tokenizer kind {meta.get('kind')!r}")
    return cls(meta["tokens"], lowercase=meta["lowercase"], written=meta.get("written"))


def is_cjk(ch: str) -> bool:
    """True for characters of scripts written without spaces between words."""
    if not ch:
        return False
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # Hiragana, Katakana
        or 0x3400 <= code <= 0x4DBF  # CJK Extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK Unified Ideographs
        or 0xF900 <= code <= 0xFAFF  # CJK Compatibility Ideographs
        or 0x20000 <= code <= 0x3134F  # Extensions B-G
    )
