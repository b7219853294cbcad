"""The PPMoE dispatcher equals the EP=1 reference (mpirun), and rejects bad setups (1 process)."""

import pytest

from piper_moe import MoEConfig, MoELayer
from piper_moe.common import even_split as chunks
from tests.launch import run_mpi

CFG = MoEConfig(hidden=8, ffn_hidden=16, num_experts=8, top_k=2)
NUM_SCENARIOS = 9  # ppmoe_cases.PP_SCENARIOS


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 4], ids=["tp2", "tp4"])
def test_exact_vs_reference(nprocs):
    run = run_mpi(nprocs, "moe.ppmoe_cases:exactness")
    assert all(r["result"] == 3 * NUM_SCENARIOS for r in run.ranks)


@pytest.mark.mpi
def test_gradcheck_tp2():
    run = run_mpi(2, "moe.ppmoe_cases:gradcheck")
    assert all(r["result"] == 4 for r in run.ranks)


def test_chunks_cover_rows():
    assert chunks(7, 3) == [3, 2, 2]
    assert chunks(2, 4) == [1, 1, 0, 0]
    assert chunks(0, 2) == [0, 0]


def test_bad_setups_raise():
    with pytest.raises(ValueError, match="dispatcher must be one of"):
        MoELayer(CFG, dispatcher="ring")
    with pytest.raises(ValueError, match="needs comm"):
        MoELayer(CFG, dispatcher="ppmoe")
    with pytest.raises(ValueError, match="sequence_sharded=True needs dispatcher='ppmoe'"):
        MoELayer(CFG, sequence_sharded=True)
