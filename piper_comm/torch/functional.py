"""Drop-in all_to_all_single / all_to_all with torch.distributed's signatures, run by Piper.

Differences from torch.distributed: the result is differentiable (use the returned tensor:
`out = all_to_all_single(out, x, ...)`; its backward is the reverse all-to-all), and
`async_op=True` returns a Work that is already complete (Piper runs the call right away).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..communicator import Communicator
from .groups import resolve


def _single(comm: Communicator, output: torch.Tensor, input: torch.Tensor,
            output_split_sizes: Sequence[int] | None, input_split_sizes: Sequence[int] | None,
            name: str) -> None:
    """Fills `output` (torch semantics: empty/None split sizes mean an equal split of dim 0;
    output must have exactly the rows that arrive). Errors are raised on every rank."""
    P = comm.size
    rows_in = input.shape[0] if input.dim() else 0
    rows_out = output.shape[0] if output.dim() else 0
    send = list(input_split_sizes) if input_split_sizes else [rows_in // P] * P
    recv = list(output_split_sizes) if output_split_sizes else [rows_out // P] * P
    comm._run(2, name, input, send, output, recv, "auto", exact_recv=True)


def _list(comm: Communicator, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """all_to_all with lists: inputs[j] goes to rank j, outputs[i] comes from rank i (shapes
    free, numel must match what the peer sends; one dtype). Sent as one flat all-to-all-v of
    elements, so any mismatch is named on every rank."""
    P = comm.size
    if len(inputs) != P or len(outputs) != P:
        raise ValueError(f"all_to_all: expected {P} input and {P} output tensors, got "
                         f"{len(inputs)} and {len(outputs)}")
    send = torch.cat([t.reshape(-1) for t in inputs])
    recv = torch.empty(sum(o.numel() for o in outputs), dtype=outputs[0].dtype)
    comm._run(2, "all_to_all", send, [t.numel() for t in inputs], recv,
              [o.numel() for o in outputs], "auto", exact_recv=True)
    for o, part in zip(outputs, torch.split(recv, [o.numel() for o in outputs])):
        o.copy_(part.view(o.shape))


class _AllToAllSingle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, output, output_split_sizes, input_split_sizes, input):
        _single(comm, output, input.detach(), output_split_sizes, input_split_sizes,
                "all_to_all_single")
        ctx.comm, ctx.osz, ctx.isz = comm, output_split_sizes, input_split_sizes
        ctx.in_shape = input.shape
        return output

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty(ctx.in_shape)
        _single(ctx.comm, grad_in, grad.contiguous(), ctx.isz, ctx.osz, "all_to_all_single")
        return None, None, None, None, grad_in


def all_to_all_single(output: torch.Tensor, input: torch.Tensor,
                      output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None, group: Any = None,
                      async_op: bool = False):
    """torch.distributed.all_to_all_single, run by Piper.

    Arguments (as torch): output [sum(output_split_sizes), *trailing] filled in place;
    input [sum(input_split_sizes), *trailing]; split sizes: one int per rank of `group`,
    None or [] for an equal split of dim 0; group: a ProcessGroup, a piper Communicator, or
    None (default group, or `piper_comm.init()` without torch.distributed).
    Returns: `output` (differentiable when input requires grad), or a completed Work when
    async_op. Bad input raises a RuntimeError (PiperUsageError) on every rank.
    """
    comm = resolve(group)
    if torch.is_grad_enabled() and input.requires_grad:
        result = _AllToAllSingle.apply(comm, output, output_split_sizes, input_split_sizes,
                                       input)
    else:
        _single(comm, output, input, output_split_sizes, input_split_sizes,
                "all_to_all_single")
        result = output
    if async_op:
        from .backend import DoneWork

        return DoneWork([result])
    return result


def all_to_all(output_tensor_list: list[torch.Tensor], input_tensor_list: list[torch.Tensor],
               group: Any = None, async_op: bool = False):
    """torch.distributed.all_to_all (lists of tensors, one per rank), run by Piper. Not
    differentiable (use all_to_all_single or AllToAll for autograd)."""
    _list(resolve(group), output_tensor_list, input_tensor_list)
    if async_op:
        from .backend import DoneWork

        return DoneWork(output_tensor_list)
    return None
