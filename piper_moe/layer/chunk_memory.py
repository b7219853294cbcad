"""What the chunked MoE forward keeps for backward of its dispatched rows (chunk_memory).

The chunked path (layer/chunked.py, pipeline_chunks C > 1) recomputes the experts in backward
from their input rows: the dispatched rows [R, H] (R rows received by this rank, H = hidden).
Those rows are the largest tensor the chunked layer keeps between forward and backward. Three
strategies, all bitwise exact (they move or recompute data; nothing is re-rounded):

    "save"       keep the rows on their device (R * H * element bytes, until backward).
    "offload"    copy them to host memory in forward (pinned, non_blocking, when the rows are
                 on CUDA; a plain copy on CPU, which frees nothing there) and back to the rows'
                 device in backward. A local decision: no communication.
    "recompute"  keep nothing: backward re-runs the dispatch all-to-all-v of every chunk from
                 the layer input x (which the router and the shared expert keep anyway) to get
                 the rows back. A COLLECTIVE in backward: every rank of the EP group must make
                 the same choice for the same forward, or the job hangs.
    "auto"       (default) per forward, from the memory the device has now (rule below).

The "auto" rule. Each rank estimates the bytes this forward would keep, est = max(N, R') * H *
element bytes (N: the (token, choice) rows it sends; R': the rows its experts received in the
layer's previous forward, since this forward's R is only known after the count exchange; under
skewed routing the receiving rank keeps more than it sends), and probes free memory: on CUDA
the driver's free bytes plus PyTorch's reserved-but-unallocated cache, on CPU the host's
MemAvailable (/proc/meminfo). A forward without autograd (no_grad, inference) keeps nothing and
wishes "save". With headroom h (chunk_memory_headroom, default 0.25: the kept rows may take
at most a quarter of what is free, leaving the rest to later layers and the backward):

    est <= h * device free               -> wish "save"     (code 0)
    else rows on CUDA, est <= h * host free -> wish "offload" (code 1)
    else                                 -> wish "recompute" (code 2)

The wishes travel, one extra int64 column, in the count exchange make_plan already does (no
extra communication), and every rank uses the largest code of the group: one short rank makes
the whole group recompute (collective), or offload. Forced modes go through the same max, so a
group whose ranks were configured differently still agrees. Each layer probes at its own
forward, so later layers see the memory earlier layers kept and back off first.
"""

from __future__ import annotations

import logging
import os

import torch

from ..common import CHUNK_MEMORY

log = logging.getLogger("piper.moe")

NAMES = CHUNK_MEMORY                                # by code: max over ranks wins
MODES = ("auto", *NAMES)  # MoEOptions.chunk_memory
CODES = {name: code for code, name in enumerate(NAMES)}


def host_available_bytes() -> int:
    """Bytes of host memory available to a new allocation (/proc/meminfo MemAvailable; else
    free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_bytes(device: torch.device) -> int:
    """Free bytes of `device` now: on CUDA the driver's free memory plus what PyTorch's caching
    allocator has reserved but not handed out (mem_get_info alone counts the cache as used, and
    after the first step the cache holds about a step's peak); else the host's available
    memory. (Module-level so tests can replace it on one rank.)"""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    return host_available_bytes()


class ChunkMemory:
    """The chunk_memory setting of one MoELayer and its last decision.

    ChunkMemory(mode="auto", headroom=0.25): mode one of MODES; headroom in (0, 1] (both
    validated by MoEOptions, which the layer builds first).
    wish(rows, hidden, elem_bytes, device) -> int code: this rank's wish for one forward
        (local, no communication); rows = the rows it expects to keep, max(N, R').
    decide(codes, rank) -> str: the strategy from every rank's code (int array [EP]), the same
        on every rank; logs on "piper.moe" (rank 0) when it changes.
    """

    def __init__(self, mode: str = "auto", headroom: float = 0.25):
        self.mode, self.headroom = mode, float(headroom)
        self.last_wish: int | None = None
        self.last_rows = 0  # rows this rank's experts received in the previous forward (R)
        self.choice: str | None = None

    def wish(self, rows: int, hidden: int, elem_bytes: int, device: torch.device) -> int:
        if self.mode != "auto":
            code = CODES[self.mode]
        else:
            est = rows * hidden * elem_bytes
            if est <= self.headroom * free_bytes(device):
                code = CODES["save"]
            elif device.type == "cuda" and est <= self.headroom * host_available_bytes():
                code = CODES["offload"]
            else:
                code = CODES["recompute"]
        self.last_wish = code
        return code

    def decide(self, codes, rank: int) -> str:
        choice = NAMES[int(max(codes))]
        if choice != self.choice and rank == 0:
            log.info("piper.moe: chunk_memory=%r: the dispatched rows are now %s "
                     "(wishes by rank: %s; 0 save, 1 offload, 2 recompute)", self.mode,
                     {"save": "kept on the device", "offload": "offloaded to host",
                      "recompute": "recomputed in backward"}[choice],
                     [int(c) for c in codes])
        self.choice = choice
        return choice


def offload(rows: torch.Tensor) -> tuple[torch.Tensor, object]:
    """rows -> (host copy, CUDA event or None). CUDA: a pinned buffer filled non_blocking,
    the event recorded after the copy; CPU: a plain copy (exact, frees nothing)."""
    if rows.is_cuda:
        host = torch.empty(rows.shape, dtype=rows.dtype, device="cpu", pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(rows.device))
        return host, event
    return rows.clone(), None


def reload(host: torch.Tensor, event, device: torch.device) -> torch.Tensor:
    """The host copy back on `device` (after the offload's copy has finished)."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)
    return host.to(device)
