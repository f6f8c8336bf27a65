"""Pinyin to hanzi: the typed letters become a lattice of readings (service/model/pinyin_lattice.py),
and a language model ranks it.

    beam      a syllable at a time (a Han character is one syllable): every hypothesis reads its
              current word's next token, or at a word boundary tries every word that starts there;
              score = log P_model(its tokens | committed text + text so far) + prior_weight *
              log P_dict(word) - abbreviation_penalty * (syllables typed as initials or partly)

P_model is the served StepModel (network and n-gram memory), so the context decides between
readings (after 他在, xian is more likely 西安; after 你, 先).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from service.model.pinyin_lattice import Lattice, Lexicon
from service.model.steps import StepModel, encode_context
from service.model.tokenizer import UNK, Tokenizer


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


def _mixer(personal, context: str, tokenizer: Tokenizer):
    """``mixer(path, values)``: the model's next-token log-probabilities after ``context`` and the tokens of
    ``path``, mixed with a user's history (``personal``); None without one."""
    if not personal:
        return None

    def mixer(path: tuple[int, ...], values: np.ndarray) -> np.ndarray:
        return personal.mix(context + tokenizer.decode(list(path)), torch.from_numpy(values))[0].numpy()

    return mixer


def _kept(rows: dict, memo: dict | None, used: dict) -> list[tuple[int, ...]]:
    """The token paths of ``rows`` whose outputs are neither in ``used`` nor in ``memo`` (those found in
    ``memo`` are copied to ``used``)."""
    missing = []
    for path in rows:
        found = used.get(path) or (memo.get(path) if memo is not None else None)
        if found is None:
            missing.append(path)
        else:
            used[path] = found
    return missing


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
        self._by_key: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

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
        personal=None,
    ) -> list[Candidate]:
        """Whole-input conversions first, best first; then conversions of a leading part, longest first.
        ``start``: the model's (log-probs [V], state) after ``context``, when the caller has them.
        ``memo``: the model's outputs kept from the caller's last conversion after the same ``start`` (a
        typing session's, whose next keystroke reads mostly the same tokens): outputs found there cost no
        forward, and it is left holding this conversion's. ``personal``: a user's history mixed into every
        next-token distribution the search reads (service/model/personal_mix.py PersonalMix), or None."""
        lattice = Lattice(pinyin, self.lexicon, fuzzy)
        if start is None:
            log_probs, state, _ = encode_context(self.model, self.tokenizer.encode(context), self.max_context_tokens)
        else:
            log_probs, state = start
        mixer = _mixer(personal, context, self.tokenizer)
        log_probs = log_probs if mixer is None else torch.from_numpy(mixer((), log_probs.numpy()))
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
            self._read(live, memo, used, mixer)
        if memo is not None:
            memo.clear()
            memo.update(used)
        kept = {position: self._distinct(found, size) for position, found in done.items()}
        return self._candidates(kept, lattice, count)

    def _children(self, live: list[_Hypothesis], lattice: Lattice, options: dict, wide: int) -> list[_Hypothesis]:
        """One more syllable for every hypothesis: the current word's next; or, at a word boundary, the
        ``wide`` best of every word that may start there after every hypothesis there (one gather)."""
        config = self.config
        children: list[_Hypothesis] = []
        at_boundary: dict = {}
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

    def _read(self, hypotheses: list[_Hypothesis], memo: dict | None, used: dict, mixer=None) -> None:
        """The tokens each hypothesis reads this step, in one forward for all. Hypotheses that read the same
        tokens after the start share a row (时 read for 时间 and for 时候; one text segmented two ways), and a
        row already in ``memo`` (or computed in this conversion) is taken from there. ``mixer(path, values)``:
        each new row mixed with a user's history."""
        rows: dict[tuple[int, ...], list[_Hypothesis]] = {}
        for h in hypotheses:
            if h.read:
                rows.setdefault(h.path + h.read, []).append(h)
        if not rows:
            return
        missing = _kept(rows, memo, used)
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
                if mixer is not None:
                    values = mixer(path, values)
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
