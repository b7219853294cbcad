"""bench/moe_layer.py's precision dimension: argument handling (one process) and a short
run on 2 ranks whose JSON reports the bytes halved by bf16 and by FP8 dispatch (mpirun)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bench import moe_layer as bench_layer
from piper_moe.layer.config import fp8_row_bytes
from tests.launch import MPIRUN, ROOT


def test_precisions_expand_variants():
    a = bench_layer.parse(["--variants", "reference,piper", "--precisions",
                           "fp32,bf16-mixed+fp8", "--peer", "torchtitan"])
    assert a.variants == ["reference", "piper@fp32", "piper@bf16-mixed+fp8", "torchtitan"]
    for bad in (["--precisions", "fp16"], ["--precisions", "fp32", "--chunks", "2"],
                ["--precisions", "fp32", "--dtype", "float64"]):
        with pytest.raises(SystemExit):
            bench_layer.parse(bad)


@pytest.mark.mpi
@pytest.mark.parametrize("peer", [False, True], ids=["piper", "with-torchtitan"])
def test_short_run_reports_bytes(tmp_path, peer):
    if peer and importlib.util.find_spec("torchtitan") is None:
        pytest.skip("torchtitan is not installed (the peer layer is optional)")
    out = tmp_path / "b.json"
    cmd = [MPIRUN, "-n", "2", sys.executable, "bench/moe_layer.py", "--hidden", "256",
           "--tokens", "64", "--iters", "1", "--warmup", "0", "--variants",
           "reference,piper-nodedup", "--precisions", "fp32,bf16-mixed,bf16-mixed+fp8",
           "--json", str(out)] + (["--peer", "torchtitan"] if peer else [])
    subprocess.run(cmd, check=True, timeout=240, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PIPER_LOCAL_SIZE": "2"})
    rows = {r["variant"]: r for r in json.loads(out.read_text())["precisions"]}
    f32, b16, f8 = (rows[f"piper-nodedup@{p}"] for p in ("fp32", "bf16-mixed",
                                                          "bf16-mixed+fp8"))
    assert f32["bytes_dispatch"] == 2 * b16["bytes_dispatch"] > 0
    assert f8["bytes_dispatch"] * 2 * 256 == b16["bytes_dispatch"] * fp8_row_bytes(256)
    assert f8["bytes_combine"] == b16["bytes_combine"]
    assert b16["rel_max_diff_vs_fp32_reference"] < 3e-2  # bf16 tolerance (precision_cases)
    if peer:
        assert rows["torchtitan"]["rel_max_diff_vs_fp32_reference"] < 3e-2
