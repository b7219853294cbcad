"""Differentiable all-to-all(v): the autograd functions MoE code builds on.

The backward of an all-to-all is the reverse all-to-all: the gradient of the rows this rank
received from rank j goes back to rank j, so the split sizes swap. Every rank of `comm` must
call forward (and, when the graph is differentiated, backward) in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .groups import resolve


class AllToAll(torch.autograd.Function):
    """y = all_to_all_v(x): rows of x go to ranks by `send_splits`; rows of y are ordered by
    source rank.

    Usage: `y = AllToAll.apply(x, send_splits, recv_splits, comm)` with
        x: tensor [sum(send_splits), *trailing] (contiguous, CPU; any dtype),
        send_splits: `comm.size` ints, rows sent to each rank,
        recv_splits: `comm.size` ints, rows expected from each rank, or None (exchanged),
        comm: a piper_comm.Communicator, a torch ProcessGroup, or None (the default group).
    Returns y: a new tensor [sum(recv_splits), *trailing]. After the call `AllToAll.last_recv`
    holds the receive split sizes (useful when recv_splits was None).
    """

    last_recv: list[int] | None = None

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: Sequence[int] | None,
                recv_splits: Sequence[int] | None, comm=None) -> torch.Tensor:
        c = resolve(comm)
        if send_splits is None:  # equal split: rows // size to every rank (size must divide)
            y = c.all_to_all(x.detach().contiguous())
            send = recv = [x.shape[0] // c.size] * c.size
        else:
            send = [int(s) for s in send_splits]
            y, recv = c.all_to_all_v(x.detach().contiguous(), send, recv_counts=recv_splits)
        ctx.comm, ctx.send, ctx.recv = c, send, recv
        AllToAll.last_recv = recv
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, _ = ctx.comm.all_to_all_v(grad.contiguous(), ctx.recv, recv_counts=ctx.send)
        return g, None, None, None


def all_to_all_v(x: torch.Tensor, send_splits: Sequence[int],
                 recv_splits: Sequence[int] | None = None, comm=None) -> tuple[torch.Tensor,
                                                                              list[int]]:
    """Functional form of AllToAll: returns (y, recv_splits)."""
    y = AllToAll.apply(x, send_splits, recv_splits, comm)
    return y, list(AllToAll.last_recv or [])
