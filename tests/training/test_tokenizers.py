import pytest

from service.model.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, load_tokenizer
from tests.conftest import TINY_EN, TINY_ZH
from training.vocabulary import TokenizerError, build_tokenizer


def lines(path):
    return open(path, encoding="utf-8").read().split("\n")[:-1]


@pytest.mark.parametrize("kind", ["char", "word", "jieba", "sentencepiece"])
@pytest.mark.parametrize("corpus", [TINY_EN, TINY_ZH])
def test_round_trip_and_serialisation(kind, corpus):
    text = lines(corpus)
    tokenizer = build_tokenizer(kind, text, vocab_size=200)
    restored = load_tokenizer(tokenizer.to_bytes())
    for line in text[:20]:
        ids = tokenizer.encode(line)
        assert UNK not in ids
        assert restored.encode(line) == ids
        if kind == "word" and corpus == TINY_EN:
            assert tokenizer.decode(ids) == line  # words re-joined, punctuation attached
        elif kind != "word":
            assert tokenizer.decode(ids) == line
    assert tokenizer.vocab_size == restored.vocab_size


@pytest.mark.parametrize("kind", ["char", "word", "sentencepiece"])
def test_special_tokens_add_no_text_and_never_come_out_of_encode(kind):
    tokenizer = load_tokenizer(build_tokenizer(kind, lines(TINY_EN), vocab_size=100).to_bytes())
    assert [tokenizer.token_text(i) for i in range(len(SPECIAL_TOKENS))] == ["", "", "", ""]
    ids = tokenizer.encode("the cat, the dog and zebra quartz!")
    assert ids and not {PAD, BOS, EOS} & set(ids)
    assert tokenizer.decode([BOS, *ids, EOS, PAD]) == tokenizer.decode(ids)


def test_chinese_characters_are_single_tokens_with_char():
    tokenizer = build_tokenizer("char", ["我昨天去了学校。"])
    ids = tokenizer.encode("我昨天")
    assert [tokenizer.token_text(i) for i in ids] == ["我", "昨", "天"]


def test_jieba_gives_words_and_spells_the_words_it_lacks_by_their_characters():
    tokenizer = build_tokenizer("jieba", ["我昨天去了学校。", "他昨天去了公园。", "学校很大。"], vocab_size=100)
    assert [tokenizer.token_text(i) for i in tokenizer.encode("我昨天去了学校")] == ["我", "昨天", "去", "了", "学校"]
    assert "公园" not in tokenizer.index  # seen once: its characters stand for it
    assert [tokenizer.token_text(i) for i in tokenizer.encode("公园大")] == ["公", "园", "大"]
    assert UNK in tokenizer.encode("月亮")  # characters never seen are unknown


def test_a_jieba_model_refuses_a_different_segmentation():
    tokenizer = build_tokenizer("jieba", ["我昨天去了学校。"])
    data = tokenizer.to_bytes().replace(tokenizer.dictionary.encode(), b"jieba 0.1 dict.txt sha256:0000")
    with pytest.raises(ValueError, match="segmented with jieba 0.1"):
        load_tokenizer(data)


def test_sentencepiece_segments_chinese_without_spaces():
    tokenizer = build_tokenizer("sentencepiece", lines(TINY_ZH), vocab_size=120)
    ids = tokenizer.encode("我们昨天去了学校。")
    assert "".join(tokenizer.token_text(i) for i in ids).strip() == "我们昨天去了学校。"
    assert len(ids) < len("我们昨天去了学校。")  # it learned multi-character pieces


def test_unseen_tokens_map_to_unk():
    tokenizer = build_tokenizer("word", ["the cat sat"])
    assert tokenizer.encode("the dog sat") == [tokenizer.encode("the")[0], UNK, tokenizer.encode("sat")[0]]


def test_word_split_keeps_apostrophes_and_separates_punctuation():
    tokenizer = build_tokenizer("word", ["don't stop, please!"])
    assert [tokenizer.tokens[i] for i in tokenizer.encode("don't stop, please!")] == [
        "don't",
        "stop",
        ",",
        "please",
        "!",
    ]


def test_vocab_size_and_min_count_limit_the_vocabulary():
    tokenizer = build_tokenizer("word", ["a a a b b c"], vocab_size=6)
    assert tokenizer.tokens[4:] == ["a", "b"]
    tokenizer = build_tokenizer("word", ["a a a b b c"], min_count=2)
    assert tokenizer.tokens[4:] == ["a", "b"]


def test_too_small_vocabulary_is_refused():
    with pytest.raises(TokenizerError, match="vocabulary too small"):
        build_tokenizer("char", ["aaaa"])
