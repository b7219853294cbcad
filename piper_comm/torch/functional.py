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
from ..errors import PiperUsageError
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
    try:
        comm._run(2, name, input, send, output, recv, "auto", exact_recv=True)
    except PiperUsageError as e:  # name the arguments as torch's signature does
        if not (input_split_sizes or output_split_sizes) and rows_in % P:
            raise PiperUsageError(f"piper: {name}: input has {rows_in} rows, not divisible "
                                  f"by the {P} ranks of the group (equal split)") from None
        raise PiperUsageError(_torch_words(str(e))) from None


_WORDS = (("send_counts", "input_split_sizes"), ("recv_counts", "output_split_sizes"),
          ("recv has", "output has"), ("send has", "input has"), ("send is", "input is"),
          ("recv is", "output is"), ("recv's", "output's"), ("send's", "input's"))


def _torch_words(msg: str) -> str:
    for a, b in _WORDS:
        msg = msg.replace(a, b)
    return msg


def _list(comm: Communicator, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """all_to_all with lists: inputs[j] goes to rank j, outputs[i] comes from rank i (shapes
    free, numel must match what the peer sends; one dtype). Sent as one flat all-to-all-v of
    elements, so any mismatch is named on every rank."""
    first = inputs[0] if inputs else outputs[0] if outputs else torch.empty(0)
    send = (torch.cat([t.reshape(-1) for t in inputs]) if inputs
            else first.new_empty(0))
    recv = (outputs[0] if outputs else first).new_empty(sum(o.numel() for o in outputs))
    try:  # list lengths are checked with the counts, so a wrong length fails on every rank
        comm._run(2, "all_to_all", send, [t.numel() for t in inputs], recv,
                  [o.numel() for o in outputs], "auto", exact_recv=True)
    except PiperUsageError as e:
        raise PiperUsageError(_torch_words(str(e)).replace("_split_sizes", "_tensor_list")
                              .replace("entries", "tensors")) from None
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
        from .backend import _done_work

        return _done_work([result])
    return result


def all_to_all(output_tensor_list: list[torch.Tensor], input_tensor_list: list[torch.Tensor],
               group: Any = None, async_op: bool = False):
    """torch.distributed.all_to_all (lists of tensors, one per rank), run by Piper. Not
    differentiable (use all_to_all_single or AllToAll for autograd)."""
    _list(resolve(group), output_tensor_list, input_tensor_list)
    if async_op:
        from .backend import _done_work

        return _done_work(output_tensor_list)
    return None
