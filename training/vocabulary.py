"""Build a tokenizer from corpus lines (the tokenizers themselves live in service/)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence

from service.model.tokenizer import (
    SPECIAL_TOKENS,
    CharTokenizer,
    JiebaTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
)

DEFAULT_VOCAB_SIZE = {"char": 10000, "word": 20000, "jieba": 12000, "sentencepiece": 8000}


class TokenizerError(ValueError):
    """The corpus cannot give a usable vocabulary."""


def _frequent(counts: Counter, vocab_size: int, min_count: int) -> list[str]:
    room = vocab_size - len(SPECIAL_TOKENS)
    # Most frequent first; ties broken by the token so the vocabulary is reproducible.
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return list(SPECIAL_TOKENS) + ranked[:room]


def build_tokenizer(
    kind: str,
    lines: Sequence[str],
    vocab_size: int | None = None,
    min_count: int = 1,
    lowercase: bool = False,
) -> Tokenizer:
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE[kind]
    if lowercase:
        lines = [line.lower() for line in lines]
    if kind == "char":
        counts = Counter(ch for line in lines for ch in line)
        tokenizer: Tokenizer = CharTokenizer(_frequent(counts, vocab_size, min_count), lowercase)
    elif kind == "word":
        counts = Counter(w for line in lines for w in WordTokenizer.split(line))
        tokenizer = WordTokenizer(_frequent(counts, vocab_size, min_count), lowercase)
    elif kind == "jieba":
        tokenizer = _jieba(lines, vocab_size, min_count)
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer(_train_sentencepiece(lines, vocab_size), lowercase)
    else:
        raise TokenizerError(f"unknown tokenizer {kind!r}; choose char, word, jieba or sentencepiece")
    if tokenizer.vocab_size <= len(SPECIAL_TOKENS) + 1:
        raise TokenizerError(
            f"vocabulary too small to train: {tokenizer.vocab_size - len(SPECIAL_TOKENS)} token(s) "
            f"besides the {len(SPECIAL_TOKENS)} special ones (need at least 2); "
            "give a larger corpus or lower --min-count"
        )
    return tokenizer


def _jieba(lines: Sequence[str], vocab_size: int, min_count: int) -> JiebaTokenizer:
    """Every character seen (so a word outside the vocabulary can be spelled), then the most frequent
    words of two or more characters seen at least twice (a word seen once teaches the model little)."""
    characters = Counter(ch for line in lines for ch in line)
    words = Counter(w for line in lines for w in JiebaTokenizer.segment(line) if len(w) > 1)
    tokens = _frequent(characters, vocab_size, min_count)
    room = vocab_size - len(tokens)
    if room > 0:
        ranked = sorted((w for w, c in words.items() if c >= max(2, min_count)), key=lambda w: (-words[w], w))
        tokens += ranked[:room]
    return JiebaTokenizer(tokens)


def _train_sentencepiece(lines: Sequence[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=0.9995,  # keeps rare Han characters out of <unk> mostly
            normalization_rule_name="identity",  # keep what people typed (NFKC would turn ！ into !)
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary, not an error
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise TokenizerError(f"sentencepiece could not train on this corpus: {error}") from None
    return model.getvalue()
