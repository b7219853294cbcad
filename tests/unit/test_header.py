"""The C++ fast verdict on gathered per-call headers (csrc/runtime/header.hpp) against every
check of piper_comm/validate.py: it accepts exactly the tables the checks accept."""

import numpy as np
import pytest

from piper_comm import _C, validate
from piper_comm.errors import PiperUsageError

P = 4


def _table(recv_given: bool = True) -> np.ndarray:
    rng = np.random.default_rng(3)
    S = rng.integers(0, 5, size=(P, P))
    t = np.zeros((P, validate.NFIXED + 2 * P), dtype=np.int64)
    t[:, validate.SEQ], t[:, validate.OP], t[:, validate.DTYPE] = 7, 2, 12
    t[:, validate.ROW_BYTES], t[:, validate.TRAIL], t[:, validate.RECV_CAP] = 16, 99, -1
    t[:, validate.NFIXED:validate.NFIXED + P] = S
    t[:, validate.NFIXED + P:] = S.T if recv_given else -1
    return t


@pytest.mark.parametrize("recv_given", [True, False])
def test_agreeing_table_gives_the_count_matrix(recv_given):
    t = _table(recv_given)
    S = _C.agree(t)
    assert np.array_equal(S, t[:, validate.NFIXED:validate.NFIXED + P])
    assert np.array_equal(validate.verdict(t, "x"), S)


@pytest.mark.parametrize("break_it", ["seq", "op", "algo", "dtype", "row_bytes", "trail", "err",
                                      "recv_count", "recv_cap"])
def test_every_problem_is_refused_and_named(break_it):
    t = _table()
    col = {"seq": validate.SEQ, "op": validate.OP, "algo": validate.ALGO,
           "dtype": validate.DTYPE, "row_bytes": validate.ROW_BYTES, "trail": validate.TRAIL,
           "err": validate.ERR}.get(break_it)
    if col is not None:
        t[2, col] += 1
    elif break_it == "recv_count":
        t[1, validate.NFIXED + P + 3] += 1  # rank 1 expects one row more from rank 3
    else:
        t[1, validate.RECV_CAP] = int(t[:, validate.NFIXED + 1].sum()) - 1
    assert _C.agree(t) is None
    with pytest.raises(PiperUsageError, match="raised on every rank"):
        validate.verdict(t, "all_to_all_v #7")
