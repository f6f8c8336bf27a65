"""Pinyin conversion: reading the letters, the dictionary baseline, and ranking by a tiny trained model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.config import ServerConfig
from service.model.engine import Engine
from service.model.pinyin import ConvertConfig, Converter, PriorOnly
from service.model.pinyin_lattice import Lattice, Lexicon, PinyinError, plain, reads_chinese
from service.model.tokenizer import SPECIAL_TOKENS, CharTokenizer
from service.model.typing_session import EditError, TypingSession


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


@pytest.fixture(scope="module")
def every_character(lexicon) -> CharTokenizer:
    """A character vocabulary of every single-character word in the lexicon (for the dictionary alone)."""
    chars = sorted({word for options in lexicon.words.values() for word, _ in options if len(word) == 1})
    return CharTokenizer(list(SPECIAL_TOKENS) + chars)


@pytest.fixture(scope="module")
def ime(tiny_ime_model) -> Engine:
    engine = Engine.load(ServerConfig(model=tiny_ime_model, batching=False, history_db="off"))
    assert engine.converter is not None
    return engine


class Counting:
    """A StepModel that passes each forward to ``model`` and records its (tokens, state) in ``forwards``."""

    def __init__(self, model, forwards: list) -> None:
        self.model, self.vocab_size, self.forwards = model, model.vocab_size, forwards

    def init_state(self, batch_size: int):
        return self.model.init_state(batch_size)

    def advance(self, tokens, state):
        self.forwards.append((tokens, state))
        return self.model.advance(tokens, state)


def texts(candidates) -> list[str]:
    return [c.text for c in candidates]


def whole(candidates, pinyin: str) -> list[str]:
    return [c.text for c in candidates if c.consumed == len(pinyin)]


def test_readings_lose_their_tones_and_write_u_umlaut_as_v():
    assert plain("lǜ") == "lv" and plain("zhōng") == "zhong" and plain("nǚ") == "nv"


def test_the_lexicon_inverts_pypinyin_and_jieba(lexicon):
    assert ("ni", "hao") in lexicon.readings("你好")
    assert ("xi", "an") in lexicon.readings("西安")
    assert ("lv", "se") in lexicon.readings("绿色")
    assert {("hang",), ("xing",)} <= set(lexicon.readings("行"))  # every reading of a single character
    assert "zhuang" in lexicon.syllables and "ng" not in lexicon.syllables


def test_the_lattice_reads_whole_syllables_separators_initials_and_a_partial_last_syllable(lexicon):
    def ends(pinyin: str, start: int = 0) -> set[int]:
        return {token.next for token in Lattice(pinyin, lexicon).tokens(start)}

    assert ends("xian") == {2, 3, 4}  # xi, xia, xian: where a whole syllable begins, x is not an initial alone
    assert ends("x") == {1} and ends("nihaox", 5) == {6}  # an initial at the end of the input
    assert ends("x'ian") == {2}  # a separator makes one anywhere
    assert ends("xi'an") == {3} and ends("xi'an", 3) == {4, 5}  # the separator goes with the syllable before it
    last = Lattice("zhongg", lexicon).tokens(5)
    assert last[0].abbreviated and "guo" in last[0].options  # an unfinished last syllable stands for its completions
    middle = Lattice("zhonggw", lexicon).tokens(5)
    assert middle[0].options and all(s.startswith("g") for s in middle[0].options)  # g is an initial anywhere
    assert ends("zhgr") == {2} and ends("zhongguo") == {5}  # zh is one initial, never z + h


@pytest.mark.parametrize(
    ("pinyin", "problem"),
    [
        ("ni hao", "' ' at position 2"),
        ("NIHAO", "'N' at position 0"),
        ("nǐhǎo", "'ǐ' at position 1"),
        ("ni1hao", "'1'"),
        ("'''", "at least one letter"),
    ],
)
def test_letters_outside_the_alphabet_are_refused_by_name(lexicon, pinyin, problem):
    with pytest.raises(PinyinError, match=problem):
        Lattice(pinyin, lexicon)


def test_the_dictionary_alone_ranks_by_word_frequency(lexicon, every_character):
    prior = Converter(PriorOnly(every_character.vocab_size), every_character, lexicon, ConvertConfig(prior_weight=1.0))
    assert prior.convert("", "zgr")[0].text == "中国人"
    assert prior.convert("", "zhongguorenmin")[0].text == "中国人民"
    assert prior.convert("", "zongguo", fuzzy=True)[0].text == "中国"  # z reads as zh with fuzzy pinyin
    assert prior.convert("", "zongguo")[0].text != "中国"


def test_full_syllables_outrank_letters_read_as_initials(lexicon, every_character):
    """renzhen is 认真 (ren zhen), not 人这年 (ren zh(e) n(ian)): letters that are whole syllables are read so,
    and initials stand for syllables only where the input needs them."""
    prior = Converter(PriorOnly(every_character.vocab_size), every_character, lexicon, ConvertConfig(prior_weight=1.0))
    for pinyin, syllables in (("renzhenzhunbei", 4), ("dianying", 2), ("shentijiankang", 4)):
        whole = [c for c in prior.convert("", pinyin) if c.consumed == len(pinyin)]
        assert [len(c.syllables) for c in whole[:3]] == [syllables] * 3, (pinyin, whole[:3])


def test_a_word_typed_as_initials_pays_its_penalty_a_syllable_at_a_time(lexicon, every_character):
    """With a large penalty, 中国人 (three initials, one word) still beats 在 + 个人: were its whole penalty
    charged at its first syllable, the beam would drop it before reading 国 and 人."""
    config = ConvertConfig(prior_weight=1.0, abbreviation_penalty=20.0)
    prior = Converter(PriorOnly(every_character.vocab_size), every_character, lexicon, config)
    assert prior.convert("", "zgr")[0].text == "中国人"


def test_hand_made_cases_on_a_tiny_model(ime):
    convert = ime.converter.convert
    assert convert("", "nihao")[0].text == "你好"
    assert {"先", "西安"} <= set(whole(convert("", "xian", 12), "xian"))
    assert convert("", "zhongg")[0].text == "中国"
    assert convert("", "nh")[0].text == "你好"
    assert convert("", "lvse")[0].text == "绿色"
    assert convert("", "nihaosj")[0].text.startswith("你好")  # mixed: whole syllables, then initials


def test_the_context_decides_between_xian_readings(ime):
    assert ime.converter.convert("他在", "xian")[0].text == "西安"
    assert ime.converter.convert("你", "xian")[0].text == "先"


def test_candidates_say_what_they_consume_whole_input_first_then_leading_parts_longest_first(ime):
    pinyin = "nihao'laoshi"
    candidates = ime.converter.convert("", pinyin, 9)
    consumed = [c.consumed for c in candidates]
    assert consumed[0] == len(pinyin) and consumed == sorted(consumed, reverse=True)
    assert any(c.consumed < len(pinyin) for c in candidates)
    best = candidates[0]
    assert best.text == "你好老师" and best.syllables == ("ni", "hao", "lao", "shi")
    part = next(c for c in candidates if c.text == "你好")
    assert part.consumed == len("nihao'")  # the separator goes with the syllable before it
    assert 0 < best.probability <= 1 and abs(sum(c.probability for c in candidates if c.consumed == 12) - 1) < 0.2


def test_the_search_computes_each_row_once_and_its_pruning_keeps_the_best_readings(ime):
    """Hypotheses that read the same token after the same state (时 of 时间 and of 时候) share a forward row;
    a reading below the whole-input candidates stops early, which never changes the best ones."""
    forwards = []
    base = ime.converter
    counted = Converter(Counting(base.model, forwards), base.tokenizer, base.lexicon, base.config)
    for context, pinyin in [("今天", "shijianhenjin"), ("他在", "xianzaiqu"), ("", "nihaolaoshi")]:
        forwards.clear()
        found = counted.convert(context, pinyin, 9)
        assert len(forwards) > 1
        for tokens, state in forwards[1:]:  # after the context's: a forward per syllable
            rows = {(tuple(tokens[i].tolist()), state[:, i].numpy().tobytes()) for i in range(tokens.size(0))}
            assert len(rows) == tokens.size(0)  # no row computed twice
        keeping_more = base.convert(context, pinyin, 20)  # more whole-input readings kept: less pruning
        assert whole(found, pinyin)[:3] == whole(keeping_more, pinyin)[:3]


def test_a_session_reuses_its_last_keystrokes_rows_and_answers_as_a_fresh_convert(ime):
    """Letter by letter, a composing session computes only the rows its last conversion lacked; every answer
    equals a fresh Convert of the same letters, including after a delete and after a commit (new text)."""
    forwards = []

    def rows() -> int:
        return sum(tokens.size(0) for tokens, _ in forwards)

    base = ime.converter
    counted = Converter(Counting(base.model, forwards), base.tokenizer, base.lexicon, base.config)
    session = TypingSession(ime.suggester, 1000, converter=counted)
    session.append("今天")
    in_session, fresh = 0, 0
    for letter in "shijianhenjin":
        session.compose(letter)
        forwards.clear()
        answer = session.convert(9)
        in_session += rows()
        forwards.clear()
        expected = counted.convert(session.text, session.composition, 9)
        fresh += rows() - 1  # the context's row, which the session keeps anyway
        assert [(c.text, c.consumed) for c in answer] == [(c.text, c.consumed) for c in expected]
        assert [c.probability for c in answer] == pytest.approx([c.probability for c in expected], rel=1e-5)
    assert in_session < fresh / 2
    # what the session keeps holds its own rows, never a view that keeps a whole batch's tensor alive
    for values, state in session._memo.values():
        assert values.base is None and state.untyped_storage().nbytes() == state.numel() * state.element_size()

    def same_as_fresh() -> None:
        answer = session.convert(9)
        expected = counted.convert(session.text, session.composition, 9)
        assert [(c.text, c.probability) for c in answer] == [(c.text, pytest.approx(c.probability)) for c in expected]

    session.delete(2)
    same_as_fresh()
    session.select(0)  # new text: the rows kept were read after the old one
    assert session.text.startswith("今天") and len(session.text) > 2
    session.compose("shijian"[len(session.composition) :])
    same_as_fresh()


def test_chinese_models_convert_and_others_do_not(ime, tiny_char_model):
    assert reads_chinese(ime.artifact.tokenizer)
    english = Engine.load(ServerConfig(model=tiny_char_model, batching=False, history_db="off"))
    assert not reads_chinese(english.artifact.tokenizer) and english.converter is None


def test_a_session_composes_selects_and_deletes(ime):
    session = TypingSession(ime.suggester, 1000, converter=ime.converter, max_letters=12)
    session.append("他在")
    session.compose("xian")
    assert session.convert(5)[0].text == "西安"
    session.compose("gongzuo")
    candidates = session.convert(9)
    assert candidates[0].text == "西安工作"
    first = next(i for i, c in enumerate(candidates) if c.text == "西安")
    session.select(first)  # commit a leading part: its letters leave, the rest keeps composing
    assert session.text == "他在西安" and session.composition == "gongzuo"
    assert session.convert(5)[0].text == "工作"
    session.delete(3)  # deletes letters of the composition first
    assert session.composition == "gong" and session.text == "他在西安"
    session.delete(6)  # then characters of the text
    assert session.composition == "" and session.text == "他在"
    with pytest.raises(EditError, match="the limit is 12"):
        session.compose("x" * 13)
    with pytest.raises(EditError, match="select 7"):
        session.select(7)


def test_association_with_word_tokens_suggests_whole_words(tiny_ime_word_model):
    engine = Engine.load(ServerConfig(model=tiny_ime_word_model, batching=False, history_db="off"))
    assert engine.artifact.manifest.tokenizer.kind == "jieba"
    assert engine.suggester.suggest("我", 3).suggestions[0][0] == "昨天"
    assert engine.suggester.suggest("他今天上学", 3).suggestions[0][0] == "迟到"
    assert engine.converter.convert("他在", "xian")[0].text == "西安"  # a word model converts too


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz'", min_size=1, max_size=24))
def test_any_letters_give_candidates_or_none_and_never_fail(pinyin):
    lexicon = Lexicon.load()
    tokenizer = CharTokenizer(list(SPECIAL_TOKENS) + list("你好中国人西安先"))
    if not pinyin.strip("'"):
        with pytest.raises(PinyinError):
            Lattice(pinyin, lexicon)
        return
    candidates = Converter(PriorOnly(tokenizer.vocab_size), tokenizer, lexicon).convert("", pinyin, 5)
    assert len(candidates) <= 5
    for candidate in candidates:
        assert 0 < candidate.consumed <= len(pinyin) and len(candidate.text) == len(candidate.syllables)
        assert 0.0 <= candidate.probability <= 1.0 + 1e-6
