"""Training data sources: a synthetic Markov language with a known loss floor, or a token file.

Every source has the same interface (numpy only, no torch):
    source.vocab
    source.batch(first, count, seq_len) -> int64 [count, seq_len + 1]: sequences with global
        indices first .. first+count-1, each a function of (seed, index) only, so that any
        data-parallel layout reading index ranges gets bitwise the same global batch.
        Inputs are [:, :-1], targets [:, 1:].
    source.entropy_rate() -> float nats/token (the loss floor) or None when unknown.
    source.describe() -> one-line string.
"""

from __future__ import annotations

from .markov import MarkovSource
from .tokens import TokenFile

__all__ = ["MarkovSource", "TokenFile", "make_source"]

_KINDS = {
    # kind: (class, required keys, optional keys), keys besides "kind"
    "markov": (MarkovSource, (), ("seed", "branching", "concentration", "smoothing")),
    "tokens": (TokenFile, ("path",), ("dtype", "seed")),
}


def make_source(cfg: dict, vocab: int):
    """A source from a config dict, e.g. {"kind": "markov", "seed": 0, "branching": 8} or
    {"kind": "tokens", "path": "corpus.bin", "dtype": "uint16"}; vocab comes from the model.

    Raises ValueError for an unknown kind, an unknown key or a missing required key.
    """
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(f"data config must be a dict with a 'kind' (one of {sorted(_KINDS)}), "
                         f"got {cfg!r}")
    kind = cfg["kind"]
    if kind not in _KINDS:
        raise ValueError(f"data kind {kind!r} is unknown; expected one of {sorted(_KINDS)}")
    cls, required, optional = _KINDS[kind]
    kwargs = {k: v for k, v in cfg.items() if k != "kind"}
    unknown = sorted(set(kwargs) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"data kind {kind!r}: unknown key(s) {unknown}; allowed: "
                         f"{sorted((*required, *optional))}")
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ValueError(f"data kind {kind!r}: missing required key(s) {missing}")
    return cls(vocab=vocab, **kwargs)
