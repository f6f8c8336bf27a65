"""Pinyin to hanzi: the typed letters become a lattice of readings, and a language model ranks it.

    letters   n i h a o s j                       ("'" separates syllables, v is ü)
    tokens    ni | hao | s | j                    full syllables; initials (where no whole syllable begins,
                                                  or at the end); a partial last syllable
    words     你 尼 拟 .. (ni)   你好 (ni hao)   好 号 (hao)   是 说 (s*)   世界 时间 (s* j*) ..
    beam      a syllable at a time (a Han character is one syllable): every hypothesis reads its
              current word's next token, or at a word boundary tries every word that starts there;
              score = log P_model(its tokens | committed text + text so far) + prior_weight *
              log P_dict(word) - abbreviation_penalty * (syllables typed as initials or partly)

P_model is the served StepModel (network and n-gram memory), so the context decides between
readings (after 他在, xian is more likely 西安; after 你, 先). The readings come from pypinyin's
character and phrase tables and the words and their frequencies from jieba's dictionary (both
MIT); ``Lexicon.load()`` inverts them once per process (about 3 s and 140 MB).
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

import numpy as np
import torch

from service.model.steps import StepModel, encode_context
from service.model.tokenizer import SPECIAL_TOKENS, UNK, Tokenizer

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
        out, i = [], 0
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


@dataclass(frozen=True)
class ConvertConfig:
    beam: int = 12  # hypotheses kept after each syllable
    prior_weight: float = 0.25  # of the dictionary's log-frequency, added to the model's (best on validation)
    abbreviation_penalty: float = 8.0  # per syllable typed as initials or partly (best on validation)
    unknown: float = -8.0  # added to <unk>'s log-probability for a character the vocabulary lacks


@dataclass(frozen=True)
class Candidate:
    text: str
    consumed: int  # letters of the input (separators included) that ``text`` stands for
    syllables: tuple[str, ...]
    probability: float
    words: tuple[str, ...] = ()


@dataclass
class _Hypothesis:
    """A reading of the syllables so far. The model has read its text up to the current word's syllables
    still ``pending`` (each: the tokens that start at that syllable, often one, () for none)."""

    score: float
    words: tuple[str, ...]
    syllables: tuple[str, ...]
    ends: tuple[int, ...]  # the letter position after each word, the current one included
    pending: tuple[tuple[int, ...], ...]
    log_probs: np.ndarray  # [V] after the tokens read (the parent's until ``read`` is read)
    state: torch.Tensor  # [L, 1, S], likewise
    read: tuple[int, ...] = ()  # tokens this step reads
    share: float = 0.0  # the current word's weighted prior and penalty per syllable, added at each of its syllables
    path: tuple[int, ...] = ()  # every token read after the start, ``read`` not yet included

    @property
    def text(self) -> str:
        return "".join(self.words)


class PriorOnly:
    """A StepModel that knows nothing (log-probability 0 for every token): with it, and prior_weight 1,
    the converter ranks by the dictionary alone (the baseline that evaluation compares with)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def init_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 1)

    def advance(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(tokens.size(0), self.vocab_size), state


class Converter:
    """Ranks the readings of typed pinyin with ``model`` (any StepModel over ``tokenizer``'s ids).

    The search is synchronous in syllables, as each Han character is one syllable: after each step
    every hypothesis has read as many syllables, and the ``beam`` best go on. A hypothesis at a word
    boundary tries every word the lattice has there (its first token scored exactly, in one gather);
    one inside a word reads the word's next token. One forward per syllable reads the chosen tokens
    of all the kept hypotheses: an 8-syllable input costs 8 forwards of at most ``beam`` rows."""

    def __init__(
        self,
        model: StepModel,
        tokenizer: Tokenizer,
        lexicon: Lexicon,
        config: ConvertConfig = ConvertConfig(),
        max_context_tokens: int = 1024,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lexicon = lexicon
        self.config = config
        self.max_context_tokens = max_context_tokens
        self._schedules: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._by_key: dict[tuple[str, ...], tuple[np.ndarray, ...]] = {}

    def schedule(self, word: str) -> tuple[tuple[int, ...], ...]:
        """The model's tokens of ``word`` by the syllable (character) each starts at: 西安 is ((西,), (安,))
        with character tokens and ((西安,), ()) with a word token."""
        found = self._schedules.get(word)
        if found is None:
            slots: list[list[int]] = [[] for _ in word]
            offset = 0
            for token in self.tokenizer.encode(word) or [UNK]:
                slots[min(offset, len(word) - 1)].append(token)
                offset += max(1, len(self.tokenizer.token_text(token).strip())) if token != UNK else 1
            found = self._schedules[word] = tuple(tuple(slot) for slot in slots)
            if len(self._schedules) > 500_000:
                self._schedules.clear()
        return found

    def _arrays(self, key: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the words of ``key``: their first tokens, their log priors per syllable, and their places."""
        found = self._by_key.get(key)
        if found is None:
            options = self.lexicon.words[key]
            found = self._by_key[key] = (
                np.array([self.schedule(word)[0][0] for word, _ in options]),
                np.array([prior / len(key) for _, prior in options], dtype=np.float32),
                np.arange(len(options)),
            )
            if len(self._by_key) > 200_000:
                self._by_key.clear()
        return found

    def convert(
        self,
        context: str,
        pinyin: str,
        count: int = 9,
        fuzzy: bool = False,
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
        memo: dict | None = None,
    ) -> list[Candidate]:
        """Whole-input conversions first, best first; then conversions of a leading part, longest first.
        ``start``: the model's (log-probs [V], state) after ``context``, when the caller has them.
        ``memo``: the model's outputs kept from the caller's last conversion after the same ``start`` (a
        typing session's, whose next keystroke reads mostly the same tokens): outputs found there cost no
        forward, and it is left holding this conversion's."""
        lattice = Lattice(pinyin, self.lexicon, fuzzy)
        if start is None:
            log_probs, state, _ = encode_context(self.model, self.tokenizer.encode(context), self.max_context_tokens)
        else:
            log_probs, state = start
        live = [_Hypothesis(0.0, (), (), (lattice.start,), (), log_probs.numpy(), state)]
        done: dict[int, list[_Hypothesis]] = {}  # by letter position: readings whose last word ends there
        options: dict[int, tuple] = {}
        size = max(count, self.config.beam)  # whole-input readings kept (their shares are within these)
        used: dict[tuple[int, ...], tuple[np.ndarray, torch.Tensor]] = {}  # the model's outputs by token path
        for _ in range(lattice.length):
            children = self._children(live, lattice, options, self.config.beam + count)
            if not children:
                break
            children.sort(key=lambda h: -h.score)
            live, seen = [], set()
            for child in children:
                if child.pending:
                    key = (child.text, child.ends[-1], child.pending)
                    if key not in seen and len(live) < self.config.beam:
                        seen.add(key)
                        live.append(child)
                    continue
                # a word ends here: a (leading-part) candidate; and it goes on unless the input is read
                ended = done.setdefault(child.ends[-1], [])
                if len(ended) < max(count, self.config.beam) * 2:
                    ended.append(child)
                if child.ends[-1] < lattice.length and len(live) < self.config.beam:
                    key = (child.text, child.ends[-1], ())
                    if key not in seen:
                        seen.add(key)
                        live.append(child)
            # A score only falls as a reading goes on (every term is a log-probability or a penalty), so a
            # hypothesis below the size-th best distinct whole-input reading so far can no longer reach the
            # whole-input candidates: it stops, and the syllables only such readings would take cost no forward.
            finished = self._distinct(done.get(lattice.length, []), size)
            if len(finished) == size:
                live = [h for h in live if h.score >= finished[-1].score]
            self._read(live, memo, used)
        if memo is not None:
            memo.clear()
            memo.update(used)
        kept = {position: self._distinct(found, size) for position, found in done.items()}
        return self._candidates(kept, lattice, count)

    def _children(self, live: list[_Hypothesis], lattice: Lattice, options: dict, wide: int) -> list[_Hypothesis]:
        """One more syllable for every hypothesis: the current word's next; or, at a word boundary, the
        ``wide`` best of every word that may start there after every hypothesis there (one gather)."""
        config = self.config
        children, at_boundary = [], {}
        for h in live:
            if h.pending:
                tokens = h.pending[0]
                score = h.score + h.share
                if tokens:
                    score += float(h.log_probs[tokens[0]]) + (config.unknown if tokens[0] == UNK else 0.0)
                pending = h.pending[1:]
                children.append(
                    _Hypothesis(
                        score, h.words, h.syllables, h.ends, pending, h.log_probs, h.state, tokens, h.share, h.path
                    )
                )
            elif h.ends[-1] < lattice.length:
                at_boundary.setdefault(h.ends[-1], []).append(h)
        for position, hypotheses in at_boundary.items():
            here = self._options(lattice, position, options)
            if not here:
                continue
            edges, first, static, edge_of, word_of, share = here
            scores = np.stack([h.log_probs[first] for h in hypotheses]) + static  # [H, N]: first tokens, exactly
            scores += np.array([h.score for h in hypotheses], dtype=np.float32)[:, None]
            flat = scores.ravel()
            best = np.argpartition(-flat, wide)[:wide] if flat.size > wide else np.arange(flat.size)
            for index in best:
                h, i = hypotheses[index // len(first)], index % len(first)
                edge = edges[edge_of[i]]
                word = edge.words[word_of[i]][0]
                schedule = self.schedule(word)
                children.append(
                    _Hypothesis(
                        float(flat[index]),
                        (*h.words, word),
                        (*h.syllables, *edge.key),
                        (*h.ends, edge.next),
                        schedule[1:],
                        h.log_probs,
                        h.state,
                        schedule[0],
                        float(share[i]),
                        h.path,
                    )
                )
        return children

    def _options(self, lattice: Lattice, position: int, options: dict) -> tuple:
        """The words that may start at ``position`` as arrays [N], built once per call."""
        here = options.get(position)
        if here is None:
            config = self.config
            edges = lattice.edges(position)
            if not edges:
                options[position] = here = ()
            else:
                arrays = [self._arrays(edge.key) for edge in edges]
                first = np.concatenate([a[0] for a in arrays])
                sizes = [len(a[0]) for a in arrays]
                edge_of = np.repeat(np.arange(len(edges)), sizes)
                word_of = np.concatenate([a[2] for a in arrays])
                # per syllable: the weighted prior, and the word's abbreviation penalty spread over its syllables,
                # so that readings compared after the same syllables have paid alike (中国人 for zgr, charged
                # at its first syllable, would fall behind 在 and be pruned before 国 and 人 were read)
                penalty = np.array([edge.abbreviated / len(edge.key) for edge in edges], dtype=np.float32)[edge_of]
                share = (
                    config.prior_weight * np.concatenate([a[1] for a in arrays]) - config.abbreviation_penalty * penalty
                )
                static = share + config.unknown * (first == UNK)
                options[position] = here = (edges, first, static, edge_of, word_of, share)
        return here

    def _read(self, hypotheses: list[_Hypothesis], memo: dict | None, used: dict) -> None:
        """The tokens each hypothesis reads this step, in one forward for all. Hypotheses that read the same
        tokens after the start share a row (时 read for 时间 and for 时候; one text segmented two ways), and a
        row already in ``memo`` (or computed in this conversion) is taken from there."""
        rows: dict[tuple[int, ...], list[_Hypothesis]] = {}
        for h in hypotheses:
            if h.read:
                rows.setdefault(h.path + h.read, []).append(h)
        if not rows:
            return
        missing = []
        for path in rows:
            found = used.get(path) or (memo.get(path) if memo is not None else None)
            if found is None:
                missing.append(path)
            else:
                used[path] = found
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for path in missing:  # one stacked call per length: all of them in the usual step, where each reads one token
            by_length.setdefault(len(rows[path][0].read), []).append(path)
        for paths in by_length.values():
            firsts = [rows[path][0] for path in paths]
            log_probs, states = self.model.advance(
                torch.tensor([h.read for h in firsts], dtype=torch.int64), torch.cat([h.state for h in firsts], dim=1)
            )
            table = log_probs.numpy()
            for row, path in enumerate(paths):
                values, state = table[row], states[:, row : row + 1]
                if memo is not None:  # kept past this call: its own row, not a view that holds the whole batch
                    values, state = values.copy(), state.clone()
                used[path] = (values, state)
        for path, group in rows.items():
            values, state = used[path]
            for h in group:
                h.log_probs, h.state, h.read, h.path = values, state, (), path

    @staticmethod
    def _distinct(hypotheses: list[_Hypothesis], size: int) -> list[_Hypothesis]:
        best: dict[str, _Hypothesis] = {}
        for h in sorted(hypotheses, key=lambda h: -h.score):
            if h.text not in best:
                best[h.text] = h
                if len(best) == size:
                    break
        return list(best.values())

    def _candidates(self, kept: dict[int, list[_Hypothesis]], lattice: Lattice, count: int) -> list[Candidate]:
        """Whole-input conversions, then leading parts that end where the best one has a word boundary
        (its first word or words, and their alternatives), longest first; probabilities are shares within
        each length."""
        whole = kept.get(lattice.length, [])
        boundaries = set(whole[0].ends[1:-1]) if whole else set()  # the words of the best reading
        if not whole:  # nothing reads the whole input: offer what reads the most of it
            boundaries = set(kept) - {lattice.start}
        out: list[Candidate] = []
        for position in sorted(boundaries | ({lattice.length} if whole else set()), reverse=True):
            group = kept.get(position, [])
            if not group:
                continue
            total = float(np.logaddexp.reduce([h.score for h in group]))
            room = count - len(out)
            if position == lattice.length and boundaries:  # leave leading parts half of the row
                room = max(1, math.ceil(count / 2))
            out.extend(
                Candidate(h.text, position, h.syllables, math.exp(h.score - total), h.words) for h in group[:room]
            )
            if len(out) >= count:
                break
        return out[:count]
