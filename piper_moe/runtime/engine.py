"""Runs one training step of a pipeline rank: its schedule's actions over its model chunks.

    engine = PipelineEngine(chunks, mesh, schedule="1f1b", num_micro=4, vpp=1,
                            act_shape=(micro_batch, seq_len, hidden), loss_scale=1 / tokens,
                            aux_scale=1 / num_micro)
    out = engine.run(inputs, targets)   # every rank of the job, every step

chunks: {virtual stage: module} for the stages this rank runs (stage v runs on pipeline rank
    v % pp). A chunk maps [b, s] tokens (stage 0) or [b, s, h] hidden states to [b, s, h], or
    to logits [b, s, vocab] (last stage), and has aux_loss() (the MoE balancing loss of its
    latest forward, 0-d).
inputs: list of num_micro token tensors [b, s] (needed on the rank running stage 0).
targets: list of num_micro token tensors [b, s] (needed on the rank running the last stage).
run() returns {"loss_sum": float, "tokens": int, "aux": float, "seconds": {...}}: the summed
    cross entropy (nats) over this rank's last-stage tokens (0 elsewhere).

The loss the gradients are taken of is  loss_scale * sum(CE)  +  aux_scale * sum(aux)  over
micro-batches; the caller picks loss_scale = 1 / (tokens of the global batch) so that summing
gradients over data-parallel replicas gives the global-batch mean.

Activations and gradients travel between pipeline neighbours by torch.distributed isend/recv
(tag = stage, micro-batch, direction). ZB-H1's split of a backward into input gradient (B) and
weight gradient (W) uses torch.distributed.pipelining's stage_backward_input /
stage_backward_weight (they keep the intermediate gradients B computed, so W redoes no
collective, as long as no autograd Function with a collective in its backward also owns
weights: the chunked MoE layer's expert Function does, and would run in B and again in W, so
the trainer refuses pipeline_chunks > 1 with zb-h1). Stage 0 has no input gradient: its B does
the whole backward and W nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch

from piper_comm import envs

from .mesh import wait_bounded
from .schedules import Action, build


def _tag(stage: int, mb: int, grad: bool, num_micro: int) -> int:
    return (stage * num_micro + mb) * 2 + int(grad)


class PipelineEngine:
    def __init__(self, chunks: dict[int, torch.nn.Module], mesh, *, schedule: str,
                 num_micro: int, act_shape: tuple[int, ...], loss_scale: float,
                 aux_scale: float, vpp: int = 1, dtype=torch.float32, device="cpu"):
        self.chunks, self.mesh, self.num_micro = chunks, mesh, num_micro
        self.num_stages = mesh.pp * vpp
        self.actions: list[Action] = build(schedule, mesh.pp, num_micro, vpp)[mesh.pp_rank]
        self.zero_bubble = schedule == "zb-h1"
        self.act_shape, self.dtype, self.device = tuple(act_shape), dtype, device
        self.loss_scale, self.aux_scale = loss_scale, aux_scale
        self.timeout = envs.timeout()  # seconds per point-to-point wait (PIPER_TIMEOUT)
        for v in chunks:
            if v % mesh.pp != mesh.pp_rank:
                raise ValueError(f"engine: chunk {v} belongs to pipeline rank {v % mesh.pp}, "
                                 f"this is pipeline rank {mesh.pp_rank}")

    # -- point to point
    def _send(self, t: torch.Tensor, stage_to: int, mb: int, grad: bool) -> None:
        import torch.distributed as dist

        peer = self.mesh.rank_of_stage(stage_to % self.mesh.pp)
        stage = stage_to if not grad else stage_to + 1
        t = t.detach().contiguous()
        what = f"send of the {'gradient' if grad else 'activation'} of micro-batch {mb} to " \
               f"stage {stage_to} on rank {peer} ({list(t.shape)} {t.dtype})"
        self._sends.append((dist.isend(t, peer, tag=_tag(stage, mb, grad, self.num_micro)),
                            what))

    def _recv(self, stage_from: int, mb: int, grad: bool) -> torch.Tensor:
        import torch.distributed as dist

        peer = self.mesh.rank_of_stage(stage_from % self.mesh.pp)
        buf = torch.empty(self.act_shape, dtype=self.dtype, device=self.device)
        stage = stage_from + 1 if not grad else stage_from
        work = dist.irecv(buf, peer, tag=_tag(stage, mb, grad, self.num_micro))
        self._wait(work, f"receive of the {'gradient' if grad else 'activation'} of "
                         f"micro-batch {mb} from stage {stage_from} on rank {peer} "
                         f"({list(buf.shape)} {buf.dtype})")
        return buf

    def _wait(self, work, what: str) -> None:
        """Waits for a point-to-point Work at most PIPER_TIMEOUT seconds; the error names the
        operation, this rank, the peer and the sizes."""
        wait_bounded(work, f"pipeline {what}", self.mesh.rank, self.timeout)

    # -- actions
    def _forward(self, a: Action, inputs, targets) -> None:
        v, m = a.stage, a.mb
        last = v == self.num_stages - 1
        x = inputs[m] if v == 0 else self._recv(v - 1, m, grad=False).requires_grad_()
        out = self.chunks[v](x)
        aux = self.chunks[v].aux_loss()
        roots, grads = [], []
        if last:
            flat = out.reshape(-1, out.shape[-1])
            if flat.dtype in (torch.bfloat16, torch.float16):
                flat = flat.float()  # the loss in float32 at least
            ce = torch.nn.functional.cross_entropy(flat, targets[m].reshape(-1),
                                                   reduction="sum")
            self._loss_sum += float(ce.detach())
            self._tokens += targets[m].numel()
            roots.append(ce * self.loss_scale)
            grads.append(None)
        else:
            self._send(out, v + 1, m, grad=False)
            roots.append(out)
            grads.append(None)  # filled by B from the next stage's gradient
        if aux.requires_grad:
            self._aux += float(aux.detach())
            roots.append(aux * self.aux_scale)
            grads.append(None)
        self._saved[(v, m)] = (x if v > 0 else None, roots, grads)

    def _backward(self, a: Action) -> None:
        v, m = a.stage, a.mb
        x, roots, grads = self._saved[(v, m)]
        if v != self.num_stages - 1:
            grads[0] = self._recv(v + 1, m, grad=True)
        grads = [torch.ones_like(r) if g is None else g for r, g in zip(roots, grads)]
        if self.zero_bubble and v > 0:
            from torch.distributed.pipelining._backward import stage_backward_input

            params = list(self.chunks[v].parameters())
            dx, groups = stage_backward_input(roots, grads, [x], iter(params))
            self._w_pending[(v, m)] = (params, groups)
            self._send(dx[0], v - 1, m, grad=True)
        else:
            torch.autograd.backward(roots, grads)
            if v > 0:
                self._send(x.grad, v - 1, m, grad=True)
        del self._saved[(v, m)]

    def _weight(self, a: Action) -> None:
        from torch.distributed.pipelining._backward import stage_backward_weight

        pending = self._w_pending.pop((a.stage, a.mb), None)
        if pending is not None:  # stage 0 did all of its backward in B
            params, groups = pending
            stage_backward_weight(iter(params), groups)

    def run(self, inputs: list[torch.Tensor] | None, targets: list[torch.Tensor] | None
            ) -> dict[str, Any]:
        """One step's forward and backward of every micro-batch (collective over the job).
        Gradients accumulate into the chunks' .grad (zero them before)."""
        self._saved: dict = {}
        self._w_pending: dict = {}
        self._sends: list = []
        self._loss_sum, self._tokens, self._aux = 0.0, 0, 0.0
        seconds: dict[str, float] = defaultdict(float)
        for a in self.actions:
            t0 = time.perf_counter()
            if a.kind == "F":
                self._forward(a, inputs, targets)
            elif a.kind == "B":
                self._backward(a)
            else:
                self._weight(a)
            seconds[a.kind] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for w, what in self._sends:
            self._wait(w, what)
        seconds["send_wait"] = time.perf_counter() - t0
        self._sends = []
        assert not self._saved and not self._w_pending, "schedule left work undone"
        return {"loss_sum": self._loss_sum, "tokens": self._tokens, "aux": self._aux,
                "seconds": dict(seconds)}
