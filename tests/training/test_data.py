import torch

from service.model.tokenizer import BOS, EOS
from training.data import batchify, encode_lines, make_stream, num_windows, split_lines, windows
from training.vocabulary import build_tokenizer


def test_targets_are_inputs_shifted_by_one():
    rows = batchify(torch.arange(100), batch_size=4)
    for _, inputs, targets in windows(rows, bptt=7):
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(targets, inputs + 1)  # the stream is 0..99, so the next token is +1


def test_batch_layout_rows_are_contiguous_slices_and_windows_cover_them():
    stream = torch.arange(26)
    rows = batchify(stream, batch_size=4)
    assert rows.shape == (4, 6)
    assert rows[1].tolist() == [6, 7, 8, 9, 10, 11]  # row r is stream[r*6:(r+1)*6]
    seen = [w for _, w, _ in windows(rows, bptt=2)]
    assert num_windows(rows, 2) == len(seen) == 3  # 5 predictable columns in windows of 2, 2, 1
    assert torch.equal(torch.cat(seen, dim=1), rows[:, :5])


def test_process_shards_partition_the_global_batch():
    rows = batchify(torch.arange(48), batch_size=4)
    shards = [batchify(torch.arange(48), 4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(shards, dim=0), rows)


def test_each_line_is_wrapped_in_start_and_end_tokens():
    tokenizer = build_tokenizer("char", ["ab", "ba"])
    sequences = encode_lines(tokenizer, ["ab", "b"])
    assert [list(s) for s in sequences] == [[BOS, *tokenizer.encode("ab"), EOS], [BOS, *tokenizer.encode("b"), EOS]]
    stream = make_stream(sequences)
    assert stream.tolist() == [BOS, *tokenizer.encode("ab"), EOS, BOS, *tokenizer.encode("b"), EOS]


def test_shuffled_stream_is_a_permutation_of_lines_and_reproducible():
    tokenizer = build_tokenizer("word", ["a b c d e f g h"])
    sequences = encode_lines(tokenizer, list("abcdefgh"))
    first, again = make_stream(sequences, shuffle_seed=3), make_stream(sequences, shuffle_seed=3)
    assert torch.equal(first, again)
    assert sorted(first.tolist()) == sorted(make_stream(sequences).tolist())


def test_split_is_disjoint_reproducible_and_sized():
    lines = [f"line {i}" for i in range(100)]
    train, val = split_lines(lines, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert set(train).isdisjoint(val)
    assert split_lines(lines, 0.1, seed=0) == (train, val)
