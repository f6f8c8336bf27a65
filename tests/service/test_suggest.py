import pytest

from service.model.suggest import SuggestConfig, Suggester
from service.model.tokenizer import EOS
from tests.service.fakes import FakeModel, char_tokenizer, close, word_tokenizer

# A char model over " ab.x": after the context "x" comes a space, then a word:
# 'a' (0.6) then 'a' or 'b' (0.5 each); or 'b' (0.4) then surely 'a'. Words end with a space.
# Greedy on the first letter picks 'a', but the best whole word is "ba" (0.4 > 0.3).
TOK = char_tokenizer(" ab.x")
SP, A, B, DOT, X = (TOK.index[c] for c in " ab.x")


def char_table(history):
    text = "".join(TOK.token_text(t) for t in history if t > 3)
    word = text.split(" ")[-1] if " " in text else None
    if word is None:
        return {SP: 1.0}  # after the context: a space
    if word == "":
        return {A: 0.6, B: 0.4}
    if word in ("aa", "ab", "ba"):
        return {SP: 0.9, DOT: 0.1}  # the word ends (space or full stop)
    if word == "a":
        return {A: 0.5, B: 0.5}
    if word == "b":
        return {A: 1.0}
    return {EOS: 1.0}


@pytest.fixture
def suggester():
    return Suggester(FakeModel(TOK.vocab_size, char_table), TOK)


def test_beam_search_finds_the_best_whole_word_not_the_greedy_one(suggester):
    result = suggester.suggest("x ", 3)
    words = [w for w, _ in result.suggestions]
    assert words[0] == "ba" and set(words[1:]) == {"aa", "ab"}
    probs = dict(result.suggestions)
    assert close(probs["ba"], 0.4) and close(probs["ab"], 0.3) and close(probs["aa"], 0.3)
    assert not result.completes_word and result.prefix == ""


def test_prefix_constrains_every_suggestion_and_renormalises(suggester):
    result = suggester.suggest("x a", 3)
    assert result.completes_word and result.prefix == "a"
    words = [w for w, _ in result.suggestions]
    assert all(w.startswith("a") for w in words) and "ba" not in words
    assert set(words[:2]) == {"aa", "ab"}  # then "a" itself, with the fake's negligible end probability
    assert all(close(p, 0.5) for _, p in result.suggestions[:2])
    assert close(sum(p for _, p in result.suggestions), 1.0)


def test_no_duplicates_and_sorted(suggester):
    words = suggester.suggest("x ", 10).suggestions
    assert len({w for w, _ in words}) == len(words)
    assert [p for _, p in words] == sorted((p for _, p in words), reverse=True)


def test_word_model_next_words_and_completions():
    tok = word_tokenizer(["apple", "apply", "banana", ",", "i"], lowercase=True)
    ids = {w: tok.index[w] for w in tok.tokens}

    def table(history):
        return {ids["apple"]: 0.3, ids["apply"]: 0.1, ids["banana"]: 0.4, ids[","]: 0.2}

    s = Suggester(FakeModel(tok.vocab_size, table), tok)
    result = s.suggest("I ", 3)
    assert [w for w, _ in result.suggestions] == ["banana", "apple", "apply"]  # punctuation is not a word
    assert close(dict(result.suggestions)["banana"], 0.4)
    result = s.suggest("I App", 3)
    assert result.completes_word and result.prefix == "App"
    assert [w for w, _ in result.suggestions] == ["Apple", "Apply"]  # typed case kept
    assert close(result.suggestions[0][1], 0.75) and close(result.suggestions[1][1], 0.25)


def test_phrases_for_text_without_spaces():
    tok = char_tokenizer("我们的昨天。")
    i = {c: tok.index[c] for c in "我们的昨天。"}

    def table(history):
        last = history[-1]
        if last == i["我"]:
            return {i["们"]: 0.5, i["的"]: 0.3, i["昨"]: 0.2}
        if last == i["昨"]:
            return {i["天"]: 0.9, i["。"]: 0.1}
        return {i["。"]: 0.6, i["我"]: 0.4}

    s = Suggester(FakeModel(tok.vocab_size, table), tok, SuggestConfig(phrase_threshold=0.5))
    result = s.suggest("我", 3)
    assert [w for w, _ in result.suggestions] == ["们", "的", "昨天"]
    assert close(dict(result.suggestions)["昨天"], 0.2 * 0.9)


def test_split_reads_the_text_before_the_cursor():
    s = Suggester(FakeModel(TOK.vocab_size, char_table), TOK)
    split = s.split("I like eating app")
    assert (split.context, split.typed, split.prefix, split.phrases) == ("I like eating", " app", "app", False)
    split = s.split("I like eating ")
    assert (split.context, split.typed, split.prefix) == ("I like eating", " ", "")
    split = s.split("Hello,")
    assert (split.context, split.typed, split.prefix) == ("Hello,", "", "")
    assert s.split("我昨").phrases and s.split("你好。").phrases
