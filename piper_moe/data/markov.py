"""MarkovSource: a synthetic language (a random first-order Markov chain) with a known loss floor.

Each token has `branching` random successors that share most of its next-token mass with
Dirichlet weights; a small `smoothing` mass is spread over the whole vocabulary, which makes
the chain ergodic (every transition is possible) so its stationary distribution pi is unique.
A model that learns the transition matrix P reaches the entropy rate sum_i pi_i H(P_i) and can
do no better: training curves have a floor to converge to. For vocab 512 and the defaults the
floor is 1.73 nats/token (seed 0) against log(512) = 6.24 for a uniform guess.

P is stored sparse ([vocab, branching] successors and weights), so construction and sampling
cost O(vocab * branching): large vocabularies are fine.
"""

from __future__ import annotations

import math

import numpy as np

from .counter import counter_uniform


class MarkovSource:
    """A random ergodic first-order Markov chain over `vocab` tokens.

    MarkovSource(vocab, seed=0, branching=8, concentration=1.0, smoothing=1e-3)
        vocab: number of tokens (>= 2).
        seed: int >= 0; the chain (P) and every sequence are functions of it.
        branching: distinct successors per token that carry the non-smoothed mass (1..vocab).
        concentration: Dirichlet concentration of the successor weights; smaller is peakier
            (lower floor). The expected row entropy is digamma(b*c + 1) - digamma(c + 1),
            1.72 nats for b = 8, c = 1.
        smoothing: mass in (0, 1) spread uniformly over all tokens in every row.

    Row i of P: P[i, succ[i, k]] = (1 - smoothing) * weights[i, k] + smoothing / vocab, every
    other entry smoothing / vocab.
    """

    def __init__(self, vocab: int, seed: int = 0, branching: int = 8,
                 concentration: float = 1.0, smoothing: float = 1e-3):
        if not isinstance(vocab, int) or vocab < 2:
            raise ValueError(f"vocab must be an int >= 2, got {vocab!r}")
        if not isinstance(branching, int) or not 1 <= branching <= vocab:
            raise ValueError(f"branching must be an int in [1, vocab={vocab}], got {branching!r}")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration!r}")
        if not 0 < smoothing < 1:
            raise ValueError(f"smoothing must be in (0, 1), got {smoothing!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.vocab, self.seed, self.branching = vocab, seed, branching
        self.concentration, self.smoothing = float(concentration), float(smoothing)
        rng = np.random.default_rng([seed, 0x4D61726B])  # the chain; sequences use counter.py
        self.successors = _distinct_successors(rng, vocab, branching)  # [vocab, b] int64
        self.weights = rng.dirichlet(np.full(branching, self.concentration), size=vocab)
        self._succ_cdf = np.cumsum(self.weights, axis=1)
        self._succ_cdf[:, -1] = 1.0  # a draw in [0, 1) always lands on a successor
        self.pi = self._stationary()
        self._pi_cdf = np.cumsum(self.pi)
        self._pi_cdf[-1] = 1.0

    # -- the chain
    def _row_probs(self) -> np.ndarray:
        """[vocab, b] float64: P at the successor entries."""
        return (1 - self.smoothing) * self.weights + self.smoothing / self.vocab

    def _stationary(self) -> np.ndarray:
        """pi = pi P by power iteration (float64); smoothing bounds the mixing time."""
        v, p = self.vocab, (1 - self.smoothing) * self.weights
        pi = np.full(v, 1.0 / v)
        for _ in range(100_000):
            nxt = np.bincount(self.successors.ravel(), weights=(pi[:, None] * p).ravel(),
                              minlength=v) + self.smoothing / v
            nxt /= nxt.sum()
            done = np.abs(nxt - pi).sum() < 1e-14
            pi = nxt
            if done:
                return pi
        raise RuntimeError(f"stationary distribution did not converge ({self.describe()})")

    def transition_matrix(self) -> np.ndarray:
        """Dense P [vocab, vocab] float64 (rows sum to 1); for tests and small vocabularies."""
        v = self.vocab
        p = np.full((v, v), self.smoothing / v)
        np.put_along_axis(p, self.successors, self._row_probs(), axis=1)
        return p

    def entropy_rate(self) -> float:
        """Nats/token: sum_i pi_i H(P_i), the floor of a perfect next-token predictor."""
        q, v, b = self._row_probs(), self.vocab, self.branching
        eps = self.smoothing / v
        h = -(q * np.log(q)).sum(axis=1) - (v - b) * eps * math.log(eps)
        return float(self.pi @ h)

    # -- sequences
    def batch(self, first: int, count: int, seq_len: int) -> np.ndarray:
        """Sequences first .. first+count-1: int64 [count, seq_len + 1].

        Sequence g is a function of (seed, g) only: any split of an index range into
        sub-ranges gives bitwise the same rows. Token 0 is drawn from pi, so every position
        has the same expected loss (the entropy rate). Inputs are [:, :-1], targets [:, 1:].
        """
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        u = counter_uniform(self.seed, first, count, seq_len + 1)  # [count, seq_len + 1]
        out = np.empty((count, seq_len + 1), dtype=np.int64)
        out[:, 0] = np.minimum(np.searchsorted(self._pi_cdf, u[:, 0], side="right"),
                               self.vocab - 1)
        eps, b = self.smoothing, self.branching
        for t in range(1, seq_len + 1):
            # One uniform per token: below eps picks a uniform token, else a successor
            cur, ut = out[:, t - 1], u[:, t]
            v = (ut - eps) / (1 - eps)
            k = np.minimum((v[:, None] >= self._succ_cdf[cur]).sum(axis=1), b - 1)
            nxt = self.successors[cur, k]
            smooth = ut < eps
            if smooth.any():
                nxt[smooth] = np.minimum((ut[smooth] / eps * self.vocab).astype(np.int64),
                                         self.vocab - 1)
            out[:, t] = nxt
        return out

    def describe(self) -> str:
        return (f"markov(vocab={self.vocab}, branching={self.branching}, "
                f"concentration={self.concentration:g}, smoothing={self.smoothing:g}, "
                f"seed={self.seed}): floor {self.entropy_rate():.4f} nats/token "
                f"(uniform {math.log(self.vocab):.4f})")


def _distinct_successors(rng: np.random.Generator, vocab: int, b: int) -> np.ndarray:
    """[vocab, b] int64: b distinct random tokens per row."""
    if 4 * b > vocab:  # dense: b smallest of random keys
        return np.argsort(rng.random((vocab, vocab)), axis=1)[:, :b].astype(np.int64)
    succ = rng.integers(0, vocab, size=(vocab, b))
    while True:  # redraw the rows with a repeat (few: under b^2 / 2vocab of them)
        s = np.sort(succ, axis=1)
        bad = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=1))[0]
        if bad.size == 0:
            return succ.astype(np.int64)
        succ[bad] = rng.integers(0, vocab, size=(bad.size, b))
