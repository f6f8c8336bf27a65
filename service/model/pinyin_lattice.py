"""Pinyin as a lattice: the typed letters read as syllables (full, initials, a partial last syllable,
fuzzy), and the words of the readings dictionary that each run of syllables may stand for.

    letters   n i h a o s j                       ("'" separates syllables, v is ü)
    tokens    ni | hao | s | j                    full syllables; initials (where no whole syllable begins,
                                                  or at the end); a partial last syllable
    words     你 尼 拟 .. (ni)   你好 (ni hao)   好 号 (hao)   是 说 (s*)   世界 时间 (s* j*) ..

The readings come from pypinyin's character and phrase tables and the words and their frequencies
from jieba's dictionary (both MIT); ``Lexicon.load()`` inverts them once per process (about 3 s and
140 MB). service/model/pinyin.py ranks the lattice with the language model.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from service.model.tokenizer import SPECIAL_TOKENS, Tokenizer

INITIALS = frozenset("zh ch sh b p m f d t n l g k h j q x r z c s y w".split())
SEPARATOR = "'"
LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz" + SEPARATOR)
MAX_SYLLABLE = 6  # letters in the longest syllable (zhuang)
MAX_WORD_SYLLABLES = 8
OTHER_READING = 0.1  # a character's readings after its first (most common) count a tenth of its frequency
MIN_WORD_COUNT = 5  # jieba's words seen fewer times are left out (they hold 1 % of its counts)
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
FUZZY_INITIALS = (("zh", "z"), ("ch", "c"), ("sh", "s"))  # with fuzzy pinyin, and -in/-ing, -en/-eng


MAX_PINYIN_LETTERS = 64  # the default limit on a Convert's pinyin or a Type composition (servers may set another)


class PinyinError(ValueError):
    """Letters that cannot be read as pinyin."""


@functools.lru_cache(maxsize=4096)
def plain(reading: str) -> str:
    """A toned reading without its tones, ü written v: "lǜ" -> "lv"."""
    decomposed = unicodedata.normalize("NFD", reading).replace("u\u0308", "v")
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


class SyllableTrie:
    """A node of the lexicon's keys by syllable: ``next["hao"]`` below the node of ("ni",) is ("ni", "hao"),
    whose ``words`` are 你好 and the others read so (None where no word ends)."""

    __slots__ = ("key", "words", "next")

    def __init__(self, key: tuple[str, ...] = ()) -> None:
        self.key = key
        self.words: list[tuple[str, float]] | None = None
        self.next: dict[str, SyllableTrie] = {}


@dataclass(repr=False)
class Lexicon:
    """Words by their syllables. ``words[("ni", "hao")] == [("你好", log P), ...]``, most frequent first."""

    syllables: frozenset[str]
    words: dict[tuple[str, ...], list[tuple[str, float]]]
    trie: SyllableTrie = field(default_factory=SyllableTrie)  # the keys, a syllable at a time
    starting: dict[str, tuple[str, ...]] = field(default_factory=dict)  # letters -> syllables that start so

    def __post_init__(self) -> None:
        for key, options in self.words.items():
            node = self.trie
            for end, syllable in enumerate(key, 1):
                child = node.next.get(syllable)
                if child is None:
                    child = node.next[syllable] = SyllableTrie(key[:end])
                node = child
            node.words = options
        for syllable in sorted(self.syllables):  # a fixed order, whatever the process's string hashing
            for end in range(1, len(syllable) + 1):
                self.starting.setdefault(syllable[:end], ())
                self.starting[syllable[:end]] += (syllable,)

    _shared: Lexicon | None = None
    _lock = threading.Lock()

    @classmethod
    def load(cls) -> Lexicon:
        """The lexicon from pypinyin and jieba, built at the first call of the process."""
        with cls._lock:
            if Lexicon._shared is None:
                Lexicon._shared = cls.from_entries(_dictionary_entries())
            return Lexicon._shared

    @classmethod
    def from_entries(cls, entries: Sequence[tuple[str, Sequence[str], float]]) -> Lexicon:
        """(word, its syllables, frequency) triples; a word may come with several readings."""
        total = sum(frequency for _, _, frequency in entries) or 1.0
        words: dict[tuple[str, ...], list[tuple[str, float]]] = {}
        syllables: set[str] = set()
        for word, reading, frequency in entries:
            key = tuple(reading)
            syllables.update(key)
            words.setdefault(key, []).append((word, math.log(frequency / total)))
        for options in words.values():
            options.sort(key=lambda entry: -entry[1])
        return cls(frozenset(syllables), words)

    def readings(self, text: str) -> list[tuple[str, ...]]:
        """The keys under which ``text`` is a word (for tests and evaluation)."""
        return [key for key, options in self.words.items() if any(word == text for word, _ in options)]


def _dictionary_entries() -> list[tuple[str, list[str], float]]:
    import jieba
    from pypinyin.phrases_dict import phrases_dict
    from pypinyin.pinyin_dict import pinyin_dict

    @functools.cache
    def char_readings(ch: str) -> list[str]:
        found = pinyin_dict.get(ord(ch))
        return [plain(r) for r in found.split(",")] if found else []

    def reading(word: str) -> list[str] | None:
        """A word's syllables: its phrase entry, else the longest phrase entries inside it, else each
        character's first reading (pypinyin's order puts the common one first)."""
        out: list[str] = []
        i = 0
        while i < len(word):
            for j in range(len(word), i + 1, -1):
                phrase = phrases_dict.get(word[i:j])
                if phrase:
                    out.extend(plain(options[0]) for options in phrase)
                    i = j
                    break
            else:
                options = char_readings(word[i])
                if not options:
                    return None
                out.append(options[0])
                i += 1
        return out

    entries: list[tuple[str, list[str], float]] = []
    seen: set[str] = set()
    with jieba.dt.get_dict_file() as handle:
        for line in handle:
            word, frequency, _ = line.decode("utf-8").split(" ")
            if int(frequency) < MIN_WORD_COUNT and len(word) > 1 or not _HAN.fullmatch(word):
                continue
            seen.add(word)
            if len(word) == 1:  # every reading; those after the first (the common one) as rarer
                for rank, syllable in enumerate(dict.fromkeys(char_readings(word))):
                    entries.append((word, [syllable], float(frequency) * (1.0 if rank == 0 else OTHER_READING)))
            elif len(word) <= MAX_WORD_SYLLABLES:
                syllables = reading(word)
                if syllables is not None:
                    entries.append((word, syllables, float(frequency)))
    for code in pinyin_dict:  # common-block characters that jieba lacks, as rare ones
        if 0x4E00 <= code <= 0x9FFF and chr(code) not in seen:
            entries.extend((chr(code), [syllable], 1.0) for syllable in dict.fromkeys(char_readings(chr(code))))
    # syllables with a vowel only: interjections such as "hm" and "ng" would make initials ambiguous
    usable = {s for _, reading_, _ in entries for s in reading_ if any(v in s for v in "aeiouv")}
    return [entry for entry in entries if all(s in usable for s in entry[1])]


def reads_chinese(tokenizer: Tokenizer) -> bool:
    """Whether a model's vocabulary is mostly Chinese (then it serves Convert): a third of its tokens
    or more hold a Han character."""
    size = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    han = sum(1 for i in range(len(SPECIAL_TOKENS), tokenizer.vocab_size) if _HAN.search(tokenizer.token_text(i)))
    return size > 0 and han >= size / 3


class Token(NamedTuple):
    """Letters ``start:end`` of the input read as one syllable; ``next`` skips a separator after it."""

    start: int
    end: int
    next: int
    options: tuple[str, ...]  # the syllables these letters may stand for
    abbreviated: bool  # initials or a partial last syllable, not a whole syllable


class Edge(NamedTuple):
    """Words that letters ``start:next`` may stand for, all with the syllables ``key``."""

    start: int
    next: int
    key: tuple[str, ...]
    words: list[tuple[str, float]]
    abbreviated: int  # syllables typed as initials or partly


class Lattice:
    """Every way to read ``pinyin`` as syllables and words of ``lexicon``."""

    def __init__(self, pinyin: str, lexicon: Lexicon, fuzzy: bool = False) -> None:
        for index, ch in enumerate(pinyin):
            if ch not in LETTERS:
                raise PinyinError(
                    f"pinyin may hold only the letters a-z (v for ü) and ' as a separator; "
                    f"got {ch!r} at position {index}"
                )
        if not pinyin.strip(SEPARATOR):
            raise PinyinError("pinyin must have at least one letter")
        self.pinyin = pinyin
        self.length = len(pinyin)
        self.lexicon = lexicon
        self.fuzzy = fuzzy
        self.start = len(pinyin) - len(pinyin.lstrip(SEPARATOR))
        self._tokens: dict[int, list[Token]] = {}
        self._edges: dict[int, list[Edge]] = {}
        # positions from which the rest of the input can be read as syllables (the end included)
        self.viable = {self.length}
        for position in range(self.length - 1, self.start - 1, -1):
            if any(token.next in self.viable for token in self.tokens(position)):
                self.viable.add(position)

    def tokens(self, start: int) -> list[Token]:
        found = self._tokens.get(start)
        if found is not None:
            return found
        found = []
        lexicon, text = self.lexicon, self.pinyin
        stop = text.find(SEPARATOR, start)
        stop = self.length if stop < 0 else stop
        for end in range(start + 1, min(start + MAX_SYLLABLE, stop) + 1):
            letters = text[start:end]
            if letters in lexicon.syllables:
                options, abbreviated = (self._fuzzy(letters) if self.fuzzy else (letters,)), False
            elif letters in ("z", "c", "s") and end < stop and text[end] == "h":
                continue  # zh, ch and sh are one initial: never z + h...
            elif letters in INITIALS or (end == self.length and letters in lexicon.starting):
                options, abbreviated = lexicon.starting.get(letters, ()), True
                if self.fuzzy:
                    options = tuple(dict.fromkeys(o for s in options for o in self._fuzzy(s)))
            else:
                continue
            if not options:
                continue
            after = end
            while after < self.length and text[after] == SEPARATOR:
                after += 1
            found.append(Token(start, end, after, options, abbreviated))
        if any(not token.abbreviated for token in found):
            # letters that begin a whole syllable here are not also an initial alone (w of women), except where
            # the input ends; a separator still makes one (n'ihao)
            found = [token for token in found if not token.abbreviated or token.end == self.length]
        self._tokens[start] = found
        return found

    def _fuzzy(self, syllable: str) -> tuple[str, ...]:
        """``syllable`` and those that fuzzy pinyin reads alike (zh/z, ch/c, sh/s, in/ing, en/eng)."""
        variants = {syllable}
        for retroflex, flat in FUZZY_INITIALS:
            if syllable.startswith(retroflex):
                variants.add(flat + syllable[2:])
            elif syllable.startswith(flat):
                variants.add(retroflex + syllable[1:])
        for form in list(variants):
            if form.endswith(("ing", "eng")):
                variants.add(form[:-1])
            elif form.endswith(("in", "en")):
                variants.add(form + "g")
        return tuple(sorted((v for v in variants if v in self.lexicon.syllables), key=lambda v: v != syllable))

    def edges(self, start: int) -> list[Edge]:
        """The words that may start at letter ``start``, with where each ends."""
        found = self._edges.get(start)
        if found is not None:
            return found
        found = []
        viable, length = self.viable, self.length

        def walk(position: int, node: SyllableTrie, abbreviated: int) -> None:
            below = node.next
            for token in self.tokens(position):
                if token.next not in viable:
                    continue  # the rest could not be read: a dead end
                count = abbreviated + token.abbreviated
                for syllable in token.options:
                    child = below.get(syllable)
                    if child is None:
                        continue
                    if child.words:
                        found.append(Edge(start, token.next, child.key, child.words, count))
                    if child.next and token.next < length:
                        walk(token.next, child, count)

        walk(start, self.lexicon.trie, 0)
        self._edges[start] = found
        return found
