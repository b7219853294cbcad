"""bench/moe_layer.py's predictions: the resource model (piper_moe.resource_model) priced for the
benchmarked layer, its saved-for-backward bytes and its communication time per dispatcher and
chunking, to print beside the measurements. Imported by bench/moe_layer.py and
bench/moe_layer_report.py (beside them in bench/)."""

from __future__ import annotations


def model_spec(a, cfg, ranks: int, dispatcher: str = "alltoall", chunks: int = 1,
               chunk_memory: str = "save", group: int = 1):
    """(ModelSpec, Strategy) of the resource model for this benchmark's layer: tiny-moe with
    the layer's MoE shape, one micro-batch of --tokens tokens per rank; "ppmoe" over node
    groups of ``group`` ranks (tp = ep = group)."""
    import dataclasses

    from piper_moe.resource_model import Strategy, load_model
    from piper_moe.resource_model.spec import MoESpec

    moe = MoESpec(num_experts=cfg.num_experts, top_k=cfg.top_k, expert_ffn=cfg.ffn_hidden,
                  num_shared_experts=cfg.num_shared_experts,
                  shared_expert_ffn=cfg.ffn_hidden if cfg.num_shared_experts else 0,
                  num_groups=cfg.num_groups, top_groups=cfg.topk_groups)
    model = dataclasses.replace(load_model("tiny-moe"), hidden=cfg.hidden, moe=moe)
    common = dict(pp=1, micro_batch=1, seq_len=a.tokens,
                  precision="fp32" if a.dtype != "bfloat16" else "bf16")
    if dispatcher == "ppmoe":
        return model, Strategy(dp=ranks // group, tp=group, ep=group, dispatcher="ppmoe",
                               global_batch=ranks // group,
                               **{**common, "seq_len": a.tokens * group})
    chunked = {"moe_chunks": chunks, "chunk_memory": chunk_memory} if chunks > 1 else {}
    return model, Strategy(dp=ranks, tp=1, ep=ranks, global_batch=ranks, **common, **chunked)


def model_saved(a, layer, ranks: int) -> float | None:
    """The resource model's bytes saved for backward by one forward of ``layer`` (a
    piper_moe.MoELayer after its timed forwards; piper_moe.resource_model.memory.moe_layer_saved) at
    balanced routing: the all-to-all layer, the chunked one with the chunk count and
    chunk_memory it last used (device bytes: an offloaded host copy is not counted), PPMoE over
    its node group. None where the model has no such layer (the reference, node dedup) or
    dtype (float64)."""
    from piper_moe.resource_model.memory import moe_layer_saved

    if not hasattr(layer, "dispatcher") or getattr(layer, "dedup", False) or (
            a.dtype not in ("float32", "bfloat16")) or layer.precision != "fp32":
        return None
    st = layer.stats
    if layer.dispatcher == "ppmoe":
        spec = model_spec(a, layer.cfg, ranks, "ppmoe", group=layer.comm.size)
    else:
        spec = model_spec(a, layer.cfg, ranks, chunks=st.get("chunks") or 1,
                          chunk_memory=st.get("chunk_memory") or "save")
    return moe_layer_saved(*spec)


def model_comm(a, cfg, comm, dtype_bytes: int) -> dict:
    """The resource model's per-layer communication seconds (forward; backward runs the duals
    at the same cost, so fwd+bwd is twice) of each --dispatchers entry on --platform as given
    and with the inter-node link set to the intra-node one (as the emulated nodes are)."""
    from dataclasses import replace

    from piper_moe.resource_model import comm as comm_model
    from piper_moe.resource_model import load_platform
    from piper_moe.resource_model.dispatch_cost import a2a_bytes, a2a_time, ppmoe_bytes, ppmoe_time
    from piper_moe.resource_model.estimate import chunked_a2a

    plat = load_platform(a.platform)
    P, g = comm.size, comm.local_size
    h, k, T = cfg.hidden, cfg.top_k, a.tokens
    out = {"platform": plat.name, "ranks": P, "per_node": g, "tokens_per_rank": T,
           "bytes_per_rank_fwd": {"alltoall": a2a_bytes(T, k, h, dtype_bytes, P),
                                  "halo": a2a_bytes(T, k, h, dtype_bytes, P),
                                  "ppmoe": ppmoe_bytes(T * g, h, dtype_bytes, g)}}
    chunk_counts = sorted({c for c in a.chunk_settings.values() if c != "auto" and c > 1})
    for tag, pl in (("as_given", plat), ("inter_eq_intra", replace(plat, inter=plat.intra))):
        out[tag] = {"alltoall": a2a_time(T, k, h, dtype_bytes, P, g, pl, "flat"),
                    "halo": a2a_time(T, k, h, dtype_bytes, P, g, pl, "halo"),
                    "ppmoe": ppmoe_time(T * g, h, dtype_bytes, g, pl, sequence_sharded=True)}
        # chunked layer: fwd exposed + bwd exchanges + the experts recomputed in backward
        out[tag]["chunks"] = {}
        for c in chunk_counts:
            for mem in ("save", "recompute"):
                model, st = model_spec(a, cfg, P, chunks=c, chunk_memory=mem)
                fwd, bwd, rec = chunked_a2a(model, pl, st, T * k * h * dtype_bytes,
                                             comm_model.per_node(P, 1, g))
                out[tag]["chunks"][f"{c}/{mem}"] = fwd + bwd + rec
    return out
