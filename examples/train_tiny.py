"""A tiny expert-parallel training loop written against torch.distributed only.

    torchrun --nproc-per-node 4 examples/train_tiny.py --backend piper
    mpirun -n 4 python examples/train_tiny.py --backend piper
    torchrun --nproc-per-node 4 examples/train_tiny.py --backend gloo   # same losses

Each rank owns one "expert" (a linear layer). Tokens are routed by a fixed rule with uneven
split sizes, exchanged with dist.all_to_all_single (differentiable through
torch.distributed.nn.functional), processed, sent back, and the loss is averaged with
dist.all_reduce. The Piper lines: `import piper_comm.torch` (registers "piper") and, for
mpirun, `piper_comm.torch.fill_from_mpi()` (torch's RANK, WORLD_SIZE, ... from MPI).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn

import piper_comm.torch  # registers backend "piper"

# torch 2.13 marks torch.distributed.nn.functional deprecated in favour of functional
# collectives, which do not accept Python process groups yet; this API is what code uses today.
warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_to_all_single")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="piper")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--json", help="write the losses here (rank 0)")
    args = ap.parse_args()

    piper_comm.torch.fill_from_mpi()  # under mpirun: RANK, WORLD_SIZE, ... from MPI
    dist.init_process_group(args.backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)                      # same model everywhere, then per-rank data
    experts = [torch.nn.Linear(args.hidden, args.hidden) for _ in range(size)]
    expert = experts[rank]
    opt = torch.optim.SGD(expert.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    for step in range(args.steps):
        x = torch.randn(args.tokens, args.hidden, generator=gen)
        dest = (torch.arange(args.tokens) * (step + 1 + rank)) % size   # uneven routing
        order = torch.argsort(dest, stable=True)
        send_splits = torch.bincount(dest, minlength=size)
        recv_splits = torch.empty_like(send_splits)
        dist.all_to_all_single(recv_splits, send_splits)              # counts (no grad)
        s, r = send_splits.tolist(), recv_splits.tolist()
        out = torch.empty(sum(r), args.hidden)
        h = dnn.all_to_all_single(out, x[order], r, s)               # dispatch
        h = torch.tanh(expert(h))
        back = torch.empty(args.tokens, args.hidden)
        y = dnn.all_to_all_single(back, h, s, r)                     # combine
        y = y[torch.argsort(order)]
        loss = ((y - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / size)
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
