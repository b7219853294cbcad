"""Data sources: the Markov floor against sampled text, layout independence, token files."""

import math
import time

import numpy as np
import pytest

from piper_moe.data import MarkovSource, TokenFile, make_source


@pytest.fixture(scope="module")
def markov():
    return MarkovSource(512)


def test_floor_matches_the_nll_of_the_true_chain(markov):
    p = markov.transition_matrix()
    assert np.allclose(p.sum(axis=1), 1.0) and (p > 0).all()
    assert np.allclose(markov.pi @ p, markov.pi, atol=1e-15)
    seqs = markov.batch(0, 1563, 128)  # 200k next-token predictions
    nll = -np.log(p[seqs[:, :-1], seqs[:, 1:]]).mean()
    floor = markov.entropy_rate()
    assert abs(nll - floor) < 0.01 * floor, (nll, floor)
    # Token 0 is drawn from pi: its empirical frequencies follow pi
    freq = np.bincount(seqs[:, 0], minlength=512) / len(seqs)
    assert np.abs(freq - markov.pi).sum() < 0.5


def test_floor_is_well_inside_the_range(markov):
    assert 0.5 < markov.entropy_rate() < math.log(512) - 2
    assert "markov(vocab=512" in markov.describe() and "nats/token" in markov.describe()


def test_batches_are_layout_independent_and_seeded(markov):
    whole = markov.batch(0, 8, 32)
    assert whole.dtype == np.int64 and whole.shape == (8, 33)
    assert whole.min() >= 0 and whole.max() < 512
    assert np.array_equal(whole, np.concatenate([markov.batch(0, 4, 32), markov.batch(4, 4, 32)]))
    assert np.array_equal(whole[5:7], markov.batch(5, 2, 32))
    assert np.array_equal(whole, MarkovSource(512).batch(0, 8, 32))  # a fresh instance
    other = MarkovSource(512, seed=1)
    assert not np.array_equal(whole, other.batch(0, 8, 32))
    assert other.entropy_rate() != markov.entropy_rate()
    assert not np.array_equal(markov.batch(8, 8, 32), whole)  # sequences differ by index


def test_batch_is_fast(markov):
    markov.batch(0, 64, 128)
    t0 = time.perf_counter()
    for i in range(10):
        markov.batch(64 * i, 64, 128)
    per_batch = (time.perf_counter() - t0) / 10
    assert per_batch < 0.02, f"{per_batch * 1e3:.1f} ms per batch of 64 x 129"


@pytest.mark.parametrize("vocab", [2, 8, 4096])
def test_small_and_large_vocabularies(vocab):
    src = MarkovSource(vocab, branching=min(8, vocab))
    assert 0 < src.entropy_rate() < math.log(vocab) + 1e-9
    x = src.batch(3, 5, 7)
    assert x.shape == (5, 8) and x.min() >= 0 and x.max() < vocab


@pytest.mark.parametrize(("kw", "match"), [
    ({"vocab": 1}, "vocab must be an int >= 2"),
    ({"vocab": 8, "branching": 9}, r"branching must be an int in \[1, vocab=8\]"),
    ({"vocab": 8, "smoothing": 0.0}, r"smoothing must be in \(0, 1\)"),
    ({"vocab": 8, "concentration": 0}, "concentration must be > 0"),
    ({"vocab": 8, "seed": -1}, "seed must be an int >= 0"),
])
def test_markov_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MarkovSource(**kw)


def _token_file(tmp_path, tokens, dtype="uint16"):
    path = tmp_path / "corpus.bin"
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def test_token_file_windows(tmp_path):
    stream = np.arange(1000) % 97
    src = TokenFile(_token_file(tmp_path, stream), vocab=97, seed=3)
    x = src.batch(0, 16, 10)
    assert x.dtype == np.int64 and x.shape == (16, 11)
    for row in x:  # each row is a contiguous window of the stream
        start = int(np.flatnonzero(stream == row[0])[0])
        assert np.array_equal(row, stream[start:start + 11])
    assert np.array_equal(x, np.concatenate([src.batch(0, 5, 10), src.batch(5, 11, 10)]))
    assert not np.array_equal(x, TokenFile(src.path, vocab=97, seed=4).batch(0, 16, 10))
    assert src.entropy_rate() is None and "corpus.bin" in src.describe()
    # A window may end on the last token, never past it
    ends = TokenFile(_token_file(tmp_path, np.arange(12), "uint32"), 12, "uint32").batch(0, 64, 10)
    assert ends[:, -1].max() == 11 and set(ends[:, 0]) == {0, 1}


def test_token_file_errors(tmp_path):
    path = _token_file(tmp_path, np.arange(20))
    with pytest.raises(ValueError, match=r"holds 20 tokens, too short .* 21 tokens"):
        TokenFile(path, vocab=32).batch(0, 1, 20)
    with pytest.raises(ValueError, match=r"corpus.bin: token (1[0-9]) at token offset \1 "
                                         r"\(byte \d+\) is outside \[0, vocab=10\)"):
        TokenFile(path, vocab=10).batch(0, 8, 12)
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"corpus.bin: size 7 bytes is not a multiple .* uint16"):
        TokenFile(path, vocab=10)
    with pytest.raises(ValueError, match="integer type"):
        TokenFile(path, vocab=10, dtype="float32")


def test_make_source(tmp_path):
    src = make_source({"kind": "markov", "seed": 2, "branching": 4}, vocab=64)
    assert isinstance(src, MarkovSource) and (src.seed, src.branching, src.vocab) == (2, 4, 64)
    path = _token_file(tmp_path, np.arange(100))
    tok = make_source({"kind": "tokens", "path": str(path), "dtype": "uint16"}, vocab=100)
    assert isinstance(tok, TokenFile) and tok.num_tokens == 100
    with pytest.raises(ValueError, match=r"data kind 'text' is unknown; expected one of"):
        make_source({"kind": "text"}, vocab=8)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['branchng'\]; allowed"):
        make_source({"kind": "markov", "branchng": 4}, vocab=8)
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['path'\]"):
        make_source({"kind": "tokens"}, vocab=8)
    with pytest.raises(ValueError, match="must be a dict with a 'kind'"):
        make_source({"seed": 0}, vocab=8)
