"""Validate the resource model (issue 6, point 7) and write bench/results/model_validation.md.

1. Closed forms: parameter counts of the shipped models against the publishers' numbers.
2. Peak memory of real training steps (forward, backward, Adam step) of the reference PyTorch MoE
   transformer (``bench/moe_reference.py``) on CPU, predicted by ``piper_moe.model.memory``.

How peak memory is measured on CPU: every CPU tensor's bytes come from c10's CPU allocator, which
reports each allocation and free (with the running total of live bytes, "Total Allocated") to the
PyTorch profiler when ``profile_memory=True``. The CPU allocator does not cache, so the running
total is exactly the bytes held by live tensors, including the temporaries that kernels allocate
inside an op; it is the CPU counterpart of ``torch.cuda.max_memory_allocated``. Everything of a
configuration (model, optimizer, data, three training steps) runs inside one profiler session, so
every allocation and every free is seen; the peak is the maximum running total inside the third
step (steady state: gradients and Adam states already exist), the static part is the running total
just before that step. Memory that libraries allocate outside c10 (oneDNN/MKL scratch, the Python
heap) is not counted, as cuBLAS workspaces are not counted by max_memory_allocated.

    .venv/bin/python bench/model_validation.py [--out bench/results/model_validation.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_reference import MoETransformer

from piper_moe.model import Strategy, load_model, load_platform
from piper_moe.model.memory import stage_memory
from piper_moe.model.params import count_params

MIB = 2**20

# published (total, active) parameter counts and the convention each publisher counts in
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9, "params_active", "Mistral AI, Mixtral of experts"),
    "deepseek-v3": (671e9, 37e9, "params_active_no_embedding", "arXiv 2412.19437 Table 1"),
    "deepseek-v2-lite": (15.7e9, 2.4e9, "params_active_no_embedding", "arXiv 2405.04434 App. B"),
    "deepseek-moe-16b": (16.4e9, 2.8e9, "params_active", "arXiv 2401.06066 §5"),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, "params_active", "Qwen3-30B-A3B model card"),
}


@dataclasses.dataclass(kw_only=True)
class Case:
    """One measured configuration of the reference model."""

    name: str
    model_overrides: dict
    micro_batch: int
    seq_len: int
    num_micro: int = 1
    schedule: str = "1f1b"  # 1f1b: forward+backward per micro-batch; gpipe: all forwards first
    recompute: str = "none"
    capacity_factor: float | None = None


CASES = [
    Case(name="base b4 s128", model_overrides={}, micro_batch=4, seq_len=128),
    Case(name="b8 s256", model_overrides={"seq_len": 256}, micro_batch=8, seq_len=256),
    Case(name="b8 s256 full recompute", model_overrides={"seq_len": 256}, micro_batch=8,
         seq_len=256, recompute="full"),
    Case(name="b8 s256 capacity 1.25", model_overrides={"seq_len": 256}, micro_batch=8,
         seq_len=256, capacity_factor=1.25),
    Case(name="b4 s256 gpipe m=4 in flight", model_overrides={"seq_len": 256}, micro_batch=4,
         seq_len=256, num_micro=4, schedule="gpipe"),
    Case(name="b4 s256 1f1b m=4 (grad accum)", model_overrides={"seq_len": 256}, micro_batch=4,
         seq_len=256, num_micro=4),
    Case(name="wide h256 E16 k4 no-shared", model_overrides={
        "hidden": 256, "seq_len": 256, "num_dense_layers": 2,
        "moe": {"num_experts": 16, "top_k": 4, "expert_ffn": 128, "num_shared_experts": 0}},
        micro_batch=4, seq_len=256),
    Case(name="wide full recompute cap 2.0", model_overrides={
        "hidden": 256, "seq_len": 256, "num_dense_layers": 2,
        "moe": {"num_experts": 16, "top_k": 4, "expert_ffn": 128, "num_shared_experts": 0}},
        micro_batch=4, seq_len=256, recompute="full", capacity_factor=2.0),
]


def case_model(case: Case):
    """The ModelSpec of a case: tiny-moe with overrides."""
    base = load_model("tiny-moe")
    over = dict(case.model_overrides)
    moe_over = over.pop("moe", {})
    moe = dataclasses.replace(base.moe, **moe_over)
    if moe_over.get("num_shared_experts") == 0:
        moe = dataclasses.replace(moe, shared_expert_ffn=0)
    return dataclasses.replace(base, moe=moe, **over)


def predict(case: Case) -> dict[str, float]:
    """Predicted bytes by component (no platform reserve)."""
    model = case_model(case)
    s = Strategy(dp=1, tp=1, pp=1, ep=1, micro_batch=case.micro_batch,
                 global_batch=case.micro_batch * case.num_micro, seq_len=case.seq_len, zero=0,
                 recompute=case.recompute, schedule=case.schedule, precision="fp32",
                 capacity_factor=case.capacity_factor)
    mem = stage_memory(model, load_platform("cpu-host"), s, 0)
    mem["total"] -= mem.pop("reserved")
    return mem


def _train_step(net, opt, batches, schedule: str) -> None:
    opt.zero_grad(set_to_none=False)  # persistent gradient buffers, as Megatron's grad buffer
    if schedule == "gpipe":
        sum(net(ids, tgt) for ids, tgt in batches).backward()
    else:
        for ids, tgt in batches:
            net(ids, tgt).backward()
    opt.step()


def measure(case: Case, steps: int = 3) -> dict[str, float]:
    """Measured live bytes: static before the last step and peak during it (see module doc)."""
    model = case_model(case)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            net = MoETransformer(model, capacity_factor=case.capacity_factor,
                                 recompute=case.recompute)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
            g = torch.Generator().manual_seed(1)
            batches = [(torch.randint(0, model.vocab, (case.micro_batch, case.seq_len),
                                      generator=g),
                        torch.randint(0, model.vocab, (case.micro_batch, case.seq_len),
                                      generator=g)) for _ in range(case.num_micro)]
            for i in range(steps):
                with record_function(f"piper_step{i}"):
                    _train_step(net, opt, batches, case.schedule)
        prof.export_chrome_trace(trace)
        with open(trace, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    last = next(e for e in events if e.get("name") == f"piper_step{steps - 1}"
                and e.get("ph") == "X")
    t0, t1 = last["ts"], last["ts"] + last["dur"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                 if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    # the running total is process-wide: count from its value when this session began
    origin = mem[0][1] - mem[0][2]
    before = [v for ts, v, _ in mem if ts < t0]
    inside = [v for ts, v, _ in mem if t0 <= ts <= t1]
    return {"static": float(before[-1] - origin), "peak": float(max(inside) - origin)}


def param_rows() -> list[dict]:
    rows = []
    for name, (total, active, convention, source) in PUBLISHED.items():
        c = count_params(load_model(name))
        ours_active = c.active if convention == "params_active" else c.active_no_embedding
        rows.append({"model": name, "total": c.total, "published_total": total,
                     "total_err": c.total / total - 1, "active": ours_active,
                     "active_all": c.active, "published_active": active,
                     "active_err": ours_active / active - 1, "convention": convention,
                     "source": source})
    return rows


def write_md(path: Path, params: list[dict], mem_rows: list[dict]) -> None:
    lines = ["# Resource model validation", "",
             "Produced by `.venv/bin/python bench/model_validation.py` "
             f"(torch {torch.__version__}, CPU, 1 thread). Sizes in MiB (2^20 bytes).", "",
             "## 1. Parameter counts (closed form vs published)", "",
             "| model | ours total | published | err | ours active | published | err | "
             "convention | source |", "|---|---|---|---|---|---|---|---|---|"]
    for r in params:
        lines.append(
            f"| {r['model']} | {r['total'] / 1e9:.2f}B | {r['published_total'] / 1e9:.1f}B | "
            f"{100 * r['total_err']:+.2f}% | {r['active'] / 1e9:.3f}B | "
            f"{r['published_active'] / 1e9:.1f}B | {100 * r['active_err']:+.2f}% | "
            f"`{r['convention']}` | {r['source']} |")
    lines += ["",
              "`params_active` counts every parameter a token touches including the input "
              "embedding table (Mistral's and Hugging Face's convention: Mixtral 12.88B -> "
              "\"12.9B\"); `params_active_no_embedding` leaves out the input embedding, which is "
              "how DeepSeek counts \"activated\" parameters (V2: 20.85B -> \"21B\"). "
              "DeepSeek-V3 is 37.55B with the embedding (+1.5%) and 36.63B without it (-1.0%): "
              "the published \"37B\" is rounded to two digits, and neither convention lands within "
              "1% of it. Totals are within 0.3% for every model.", "",
              "## 2. Peak memory of training steps on CPU (predicted vs measured)", "",
              "Model: `tiny-moe` (4 layers, first dense, GQA 4/2 heads, 8 experts top-2 + 1 "
              "shared, h=128, V=512) and a wider variant; fp32 weights, gradients (persistent "
              "buffers) and fused Adam (m, v): 16 bytes/parameter. Single process "
              "(dp=tp=pp=ep=1); `gpipe` keeps all micro-batches in flight, `1f1b` with pp=1 runs "
              "forward+backward per micro-batch (gradient accumulation).", "",
              "Measurement: " + " ".join(__doc__.split("How peak memory is measured on CPU: ")[1]
                                          .split("\n\n")[0].split()), "",
              "| case | static pred | static meas | peak pred | peak meas | peak err | "
              "dynamic pred | dynamic meas | dynamic err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in mem_rows:
        lines.append(
            f"| {r['case']} | {r['static_pred'] / MIB:.2f} | {r['static_meas'] / MIB:.2f} | "
            f"{r['peak_pred'] / MIB:.2f} | {r['peak_meas'] / MIB:.2f} | "
            f"{100 * r['peak_err']:+.1f}% | {r['dyn_pred'] / MIB:.2f} | "
            f"{r['dyn_meas'] / MIB:.2f} | {100 * r['dyn_err']:+.1f}% |")
    worst = max(abs(r["peak_err"]) for r in mem_rows)
    worst_dyn = max(abs(r["dyn_err"]) for r in mem_rows)
    lines += ["",
              f"Worst peak error {100 * worst:.1f}% (target 5%); worst error on the dynamic part "
              f"(peak - static: activations, MoE buffers, transients) {100 * worst_dyn:.1f}%. "
              "Static = weights + gradients + optimizer states (predicted) vs live bytes before "
              "the step (measured: also holds the token batches and RoPE tables).", "",
              "Not validated here: tensor/sequence, expert and pipeline parallelism across ranks "
              "(the formulas divide by tp, ep x etp, and count in-flight micro-batches; the "
              "in-flight count is exercised by the gpipe case), selective recompute (the "
              "reference model has none), MLA attention, bf16 (CPU runs fp32), and GPU "
              "`torch.cuda.max_memory_allocated` (no GPU was lent to this task).", "",
              "## 3. All-to-all time: calibrated model vs benchmark", "",
              "**TODO (needs `python -m piper_comm.bench`, not available when this was written).** "
              "Plan: on a host, `PIPER_LOCAL_SIZE=k mpirun -np N python -m piper_moe.calibrate "
              "--out cal.yaml` for one (N, k), then predict with `piper_moe.model.comm."
              "a2a_flat/a2a_halo` and compare with `piper_comm.bench --op alltoall --algos "
              "halo,flat` for N in {4, 8, 16} and two node splits each (k = N/2, N/4), "
              "per-peer blocks 1 KiB - 1 MiB; target error 15%. `calibrate` already measures "
              "through piper_comm (checked with 4 ranks, PIPER_LOCAL_SIZE=2) and its least-squares "
              "fit recovers alpha/beta exactly from model-generated timings "
              "(tests/model/test_calibrate.py).", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                             / "model_validation.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = param_rows()
    mem_rows = []
    for case in CASES:
        t = time.perf_counter()
        pred, meas = predict(case), measure(case)
        static_pred = pred["weights"] + pred["gradients"] + pred["optimizer"]
        dyn_pred = pred["total"] - static_pred
        dyn_meas = meas["peak"] - meas["static"]
        row = {"case": case.name, "static_pred": static_pred, "static_meas": meas["static"],
               "peak_pred": pred["total"], "peak_meas": meas["peak"],
               "peak_err": pred["total"] / meas["peak"] - 1, "dyn_pred": dyn_pred,
               "dyn_meas": dyn_meas, "dyn_err": dyn_pred / dyn_meas - 1, "pred": pred}
        mem_rows.append(row)
        print(f"{case.name:34s} peak pred {pred['total'] / MIB:8.2f} MiB meas "
              f"{meas['peak'] / MIB:8.2f} MiB err {100 * row['peak_err']:+5.1f}%  dynamic err "
              f"{100 * row['dyn_err']:+5.1f}%  ({time.perf_counter() - t:.1f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_md(out, params, mem_rows)
    with open(out.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump({"params": params, "memory": mem_rows}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
