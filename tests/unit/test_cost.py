"""piper_comm.cost: the closed-form uniform case is predict() on the uniform matrix."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from piper_comm import cost
from piper_comm.errors import PiperUsageError

# Distinct powers of ten, so that a term charged at the wrong rate shows.
LINKS = cost.Links(alpha_intra=1e-6, beta_intra=1e9, alpha_inter=1e-5, beta_inter=1e8,
                   alpha_barrier=3e-6, beta_copy=1e10)


@pytest.mark.parametrize(("n", "g"), [(2, 1), (4, 1), (2, 2), (4, 4), (4, 2), (8, 2), (8, 4),
                                      (16, 4), (24, 8), (64, 8)])
@pytest.mark.parametrize("m", [0.0, 8e3, 8e6, 3.5e9])
@pytest.mark.parametrize("placement", ["blocked", "round_robin"])
def test_uniform_closed_form_is_predict_of_uniform_matrix(n, g, m, placement):
    nodes = n // g
    node_of = (np.repeat(np.arange(nodes), g) if placement == "blocked"
               else np.arange(n) % nodes)
    matrix = np.full((n, n), m / n)
    per_rank = cost.traffic(matrix, node_of)
    closed = cost.traffic_uniform(m, n, g)
    for algo in ("flat", "halo"):
        for f in dataclasses.fields(cost.Traffic):
            got = np.asarray(getattr(per_rank[algo], f.name), dtype=float)
            want = getattr(closed[algo], f.name)
            assert got == pytest.approx(np.full(got.shape, want), rel=1e-12, abs=0), (algo, f)
    t = cost.predict(matrix, node_of, LINKS)
    u = cost.predict_uniform(m, n, g, LINKS)
    assert u == pytest.approx(t, rel=1e-12, abs=1e-18)


def test_uniform_by_hand():
    # 8 ranks, 4 per node (2 nodes), 8 MB per rank -> b = 1 MB per rank
    t = cost.predict_uniform(8e6, 8, 4, LINKS)
    assert t["flat"] == pytest.approx(3 * (1e-6 + 1e6 / 1e9) + 4 * (1e-5 + 1e6 / 1e8))
    # 2 barriers, pack m, one message of g*b to the other node, copy out g*b
    assert t["halo"] == pytest.approx(2 * 3e-6 + 8e6 / 1e10 + (1e-5 + 4e6 / 1e8) + 4e6 / 1e10)
    # one node: no messages, only the barriers and the two copies
    one = cost.predict_uniform(8e6, 4, 4, LINKS)
    assert one["halo"] == pytest.approx(2 * 3e-6 + 2 * 8e6 / 1e10)
    # one-rank nodes: the executor runs flat
    solo = cost.predict_uniform(8e6, 4, 1, LINKS)
    assert solo["halo"] == solo["flat"] == pytest.approx(3 * (1e-5 + 2e6 / 1e8))
    assert cost.predict_uniform(8e6, 1, 1, LINKS) == {"flat": 0.0, "halo": 0.0}
    with pytest.raises(ValueError, match=r"ranks per node \(5\)"):
        cost.traffic_uniform(8e6, 4, 5)


def test_uneven_nodes_spread_messages_over_proxies():
    # nodes of 3 ranks and 1: node 0's one aggregated message (3 blocks, for rank 3) is spread
    # over its 3 ranks; rank 3 sends node 0's 3 ranks one block each and waits in no barrier
    node_of = np.array([0, 0, 0, 1])
    tr = cost.traffic(np.full((4, 4), 100.0), node_of)["halo"]
    assert tr.msgs_inter == pytest.approx([1 / 3, 1 / 3, 1 / 3, 3])
    assert tr.bytes_inter == pytest.approx([100, 100, 100, 300])
    assert list(tr.barriers) == [2, 2, 2, 0]
    assert tr.copy_bytes == pytest.approx([700, 700, 700, 500])


# -- the links of a platform file (PIPER_PLATFORM)
def _platforms() -> list[str]:
    from piper_moe.resource_model.spec import shipped

    calibrated = Path(__file__).resolve().parents[2] / "bench/results/cluster"
    return [*shipped("platforms"), str(calibrated / "platform_2x2_200mbit.yaml")]


@pytest.mark.parametrize("source", _platforms())
def test_links_of_a_platform_are_the_resource_models(source):
    """load_links reads the levels the resource model reads: the Links auto chooses with equal
    the ones the model prices the same platform's all-to-all with (the calibrated cluster
    file included: inf bandwidth, null barrier latency)."""
    from piper_moe.resource_model import load_platform
    from piper_moe.resource_model.comm import cost_links

    links = cost.load_links(source)
    assert links == cost_links(load_platform(source))
    assert links.source.startswith("platform ") and links.source.endswith(".yaml)")


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


GOOD = "intra: {latency: 1.0e-6, bandwidth: 2.0e+9}\ninter: {latency: 3.0e-5, bandwidth: 4.0e+8}\n"


def test_links_file_fields_and_defaults(tmp_path):
    links = cost.load_links(_yaml(tmp_path, GOOD + "copy_bandwidth: 5.0e+9\n"))
    assert links == cost.Links(alpha_intra=1e-6, beta_intra=2e9, alpha_inter=3e-5,
                               beta_inter=4e8, alpha_barrier=1e-6, beta_copy=5e9)
    links = cost.load_links(_yaml(tmp_path, GOOD + "copy_bandwidth: 5.0e+9\n"
                                  "barrier_latency: 7.0e-6\n"))
    assert links.alpha_barrier == 7e-6 and "p.yaml" in links.source
    # YAML 1.1 reads 5e9 as the string "5e9"; the resource model's loader takes it too
    assert cost.load_links(_yaml(tmp_path, GOOD + "copy_bandwidth: 5e9\n")).beta_copy == 5e9


@pytest.mark.parametrize(("text", "words"), [
    (GOOD, "copy_bandwidth must be a number > 0 (got None)"),
    (GOOD + "copy_bandwidth: -1\n", "copy_bandwidth must be a number > 0 (got -1)"),
    (GOOD + "copy_bandwidth: true\n", "copy_bandwidth must be a number > 0 (got True)"),
    ("inter: {latency: 1, bandwidth: 1}\ncopy_bandwidth: 1\n", "intra must be a mapping"),
    ("intra: {latency: -1.0, bandwidth: 1}\ninter: {latency: 1, bandwidth: 1}\n"
     "copy_bandwidth: 1\n", "intra.latency must be a number >= 0 (got -1.0)"),
    (GOOD + "copy_bandwidth: 1\nbarrier_latency: fast\n", "barrier_latency must be a number"),
    (GOOD + "copy_bandwidth: 1\nbarrier_latency: [1]\n", "barrier_latency must be a number"),
    ("- 1\n- 2\n", "expected a mapping at top level"),
    ("intra: [\n", "cannot read it"),
])
def test_a_bad_links_file_names_the_file_and_the_key(tmp_path, text, words):
    path = _yaml(tmp_path, text)
    with pytest.raises(PiperUsageError, match="platform") as e:
        cost.load_links(path)
    assert words in str(e.value) and path in str(e.value)


def test_an_unknown_platform_name_lists_the_shipped_ones():
    with pytest.raises(PiperUsageError, match=r"'dgx-h1000': not a \.yaml file.*dgx-h100"):
        cost.load_links("dgx-h1000")


def test_piper_platform_sets_a_new_communicators_links(monkeypatch):
    """PIPER_PLATFORM is read at init (envs.AT_INIT, so checked alike on every rank); unset, the
    defaults; invalid, a PiperUsageError naming the variable."""
    import piper_comm as pc

    monkeypatch.delenv("PIPER_PLATFORM", raising=False)
    comm = pc.init("single")
    assert comm.links == cost.Links() and comm.links.source.startswith("defaults")
    comm.close()
    monkeypatch.setenv("PIPER_PLATFORM", "frontier")
    comm = pc.init("single")
    assert comm.links == cost.load_links("frontier")
    assert comm.links.source.startswith("platform frontier (")
    comm.close()
    monkeypatch.setenv("PIPER_PLATFORM", "nowhere.yaml")
    with pytest.raises(PiperUsageError, match=r"PIPER_PLATFORM is invalid on ranks \[0\].*"
                                              r"PIPER_PLATFORM='nowhere\.yaml'.*cannot read it"):
        pc.init("single")
