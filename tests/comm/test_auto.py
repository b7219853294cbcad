"""algorithm="auto" chooses with the links of PIPER_PLATFORM (piper_comm.cost.load_links)."""

import numpy as np
import pytest

from piper_comm import cost
from tests.launch import run_mpi

pytestmark = pytest.mark.mpi

LEVELS = "intra: {{latency: 1.0e-6, bandwidth: 1.0e+10}}\ninter: {{latency: {inter}, " \
         "bandwidth: 1.0e+10}}\ncopy_bandwidth: 1.0e+10\nbarrier_latency: {barrier}\n"


def test_auto_follows_the_platform_of_piper_platform(tmp_path):
    """Two made-up platforms on 4 ranks as 2 nodes of 2: node barriers dear (1 s each) make
    auto run flat, a network message dear (1 s) makes it run HALO (N-1 = 1 message per rank
    instead of n-g = 2), for the equal split and for all_to_all_v, on every rank; the results
    are exact either way (checked rank-side)."""
    files = {}
    for name, inter, barrier in (("barriers_dear", 1e-6, 1.0), ("network_dear", 1.0, 0.0)):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(LEVELS.format(inter=inter, barrier=barrier))
    run = run_mpi(4, "comm.cases:auto_under_platforms",
                  {"platforms": [str(p) for p in files.values()], "local_size": 2})
    node_of = np.array([0, 0, 1, 1])
    for (name, path), want in zip(files.items(), ("flat", "halo"), strict=True):
        assert cost.choose(np.full((4, 4), 32), node_of, cost.load_links(path)) == want
        for r in run.ranks:
            got = r["result"][list(files).index(name)]
            assert (got["equal"], got["v"]) == (want, want), (name, r["rank"], got)
            assert got["source"] == f"platform {name} ({path})"
