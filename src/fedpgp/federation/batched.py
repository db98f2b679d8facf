"""Client-batched local training: the sampled clients of a round train in lockstep, as one
computation per step (docs/speed.md, "Clients in one program").

A client's local round is a handful of small products per step, so one client at a time leaves
the machine mostly waiting on Python and kernel launches. Here the K clients' tensors are
stacked (K, ...) and every step runs each active client's batch through one call of the
method's :meth:`~fedpgp.methods.base.Method.batched_losses` (for a prompt method: the K
contexts in one prefix-shared encoder call). Each client keeps its own semantics exactly: its
own data order and batches (the same generator draws as :meth:`Client.train`), its own SGD
state (momentum buffer, weight decay), its own gradient clipping norm and its own number of
steps: a client whose steps are done is left out of later steps, never fed padding. The
results equal the sequential path's up to float summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import method_lr
from ..methods.base import Tensors
from .client import Client
from .update import Update

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
_CLIP_EPS = 1e-6


class _StackedSGD:
    """torch.optim.SGD (momentum, dampening 0, weight decay, no Nesterov) on (K, ...) tensors,
    one client per row: a step updates the rows of the clients in it, and each row's momentum
    buffer starts at that client's first step, as a fresh optimizer per client does."""

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: dict[str, Tensor] = {}

    @torch.no_grad()
    def step(self, params: Tensors, grads: dict[str, Tensor | None], rows: Tensor) -> None:
        for key, grad in grads.items():
            if grad is None:
                continue
            value = params[key]
            d = grad[rows]
            if self.weight_decay:
                d = d + self.weight_decay * value[rows]
            if self.momentum:
                if key not in self.buffers:
                    self.buffers[key] = torch.zeros_like(value)
                buffer = self.buffers[key]
                # Every client's first step is the lockstep's first: a buffer row is zero
                # until then, so momentum * 0 + d is the fresh optimizer's clone(d).
                buffer[rows] = self.momentum * buffer[rows] + d
                d = buffer[rows]
            value[rows] = value[rows] - self.lr * d


def train_batched(
    clients: Sequence[Client], received: Sequence[Tensors], round: int
) -> list[Update]:
    """One local round of every client in ``clients`` (all of one method and one prompt bank)
    from what each ``received``, in lockstep; their Updates in the same order, and each client
    keeps its new PERSONAL tensors, as :meth:`Client.train` does."""
    method = clients[0].method
    cfg = method.cfg
    bank = clients[0].data.bank
    starts = [client.params(r) for client, r in zip(clients, received, strict=True)]
    keys = list(starts[0])
    params = {
        k: torch.stack([s[k] for s in starts]).detach().clone().requires_grad_(True) for k in keys
    }
    round_start = {k: torch.stack([r[k] for r in received]) for k in received[0]}
    schedules = [list(client.steps(round)) for client in clients]
    optimizer = _StackedSGD(method_lr(cfg), cfg.momentum, cfg.weight_decay)
    device = params[keys[0]].device
    losses: list[list[Tensor]] = [[] for _ in clients]
    # Clients drop out in order of their step counts, so the active set is one of K: each
    # made once, before the loop, so that no step copies from the host to the device.
    by_steps = sorted(range(len(clients)), key=lambda i: len(schedules[i]))
    row_sets = {
        len(by_steps) - dropped: torch.tensor(sorted(by_steps[dropped:]), device=device)
        for dropped in range(len(by_steps))
    }
    for t in range(max((len(s) for s in schedules), default=0)):
        active = [i for i, s in enumerate(schedules) if t < len(s)]
        rows = row_sets[len(active)]
        batches = []
        for i in active:
            epoch, step, batch = schedules[i][t]
            batches.append((clients[i].batch_features(batch, round, epoch, step), batch, i))
        width = max(len(b) for _, b, _ in batches)
        features = torch.zeros(len(active), width, *batches[0][0].shape[1:], device=device)
        labels = torch.zeros(len(active), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(active), width, dtype=torch.bool, device=device)
        for row, (feats, batch, i) in enumerate(batches):
            features[row, : len(batch)] = feats
            labels[row, : len(batch)] = clients[i].data.train_labels[batch]
            mask[row, : len(batch)] = True
        full = len(active) == len(clients)
        subset = params if full else {k: v[rows] for k, v in params.items()}
        start = round_start if full else {k: v[rows] for k, v in round_start.items()}
        per_client = method.batched_losses(subset, features, labels, mask, bank, start)
        grads = torch.autograd.grad(per_client.sum(), list(params.values()), allow_unused=True)
        by_key = dict(zip(keys, grads, strict=True))
        if cfg.grad_clip is not None:
            present = [g for g in grads if g is not None]
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in present]).sum(0).sqrt()
            scale = (cfg.grad_clip / (norms + _CLIP_EPS)).clamp(max=1.0)
            by_key = {
                k: None if g is None else g * scale.view(-1, *([1] * (g.dim() - 1)))
                for k, g in by_key.items()
            }
        optimizer.step(params, by_key, rows)
        for row, i in enumerate(active):
            losses[i].append(per_client[row].detach())
    outcomes = [
        client.outcome({k: v[i].detach() for k, v in params.items()}, got, round, losses[i])
        for i, (client, got) in enumerate(zip(clients, received, strict=True))
    ]
    # Only once every client's round is complete: a failure above leaves them all as they were.
    for client, (personal, _) in zip(clients, outcomes, strict=True):
        client.personal = personal
    return [update for _, update in outcomes]
