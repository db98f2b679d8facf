"""A client: its own data, its PERSONAL tensors, and local training that returns an Update."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ..config import RunConfig, method_lr
from ..experiment import ClientData
from ..methods.base import Method, Tensors
from ..seeding import derive_seed, torch_generator
from .faults import ClientTimeoutError
from .update import Update


class Optimizers:
    """SGD for local rounds. ``fresh`` builds one per local round (the default); ``shared``
    keeps one optimizer, and so its momentum, across rounds (in process: across clients too,
    as the authors' code does)."""

    def __init__(self, mode: str, lr: float, momentum: float, weight_decay: float) -> None:
        self.mode = mode
        self.hyper = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._params: dict[str, Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Optimizers:
        """The optimizer policy of a run: both runtimes build it here and nowhere else."""
        return cls(cfg.optimizer_state, method_lr(cfg), cfg.momentum, cfg.weight_decay)

    def prepare(self, values: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], torch.optim.SGD]:
        """Trainable copies of ``values`` and the optimizer that updates them."""
        if self.mode == "fresh" or self._optimizer is None:
            params = {k: v.detach().clone().requires_grad_(True) for k, v in values.items()}
            optimizer = torch.optim.SGD(list(params.values()), **self.hyper)
            if self.mode == "shared":
                self._params, self._optimizer = params, optimizer
            return params, optimizer
        with torch.no_grad():
            for key, value in values.items():
                self._params[key].copy_(value)
        return self._params, self._optimizer

    def buffers(self) -> Tensors:
        """The kept optimizer's state by parameter name, ``<name>/<field>`` ({} when none is
        kept): the format of checkpoints and of a node's state file."""
        if self._optimizer is None:
            return {}
        names = list(self._params)
        state = self._optimizer.state_dict()["state"]
        return {
            f"{names[index]}/{field}": value.detach().clone()
            for index, entries in state.items()
            for field, value in entries.items()
            if isinstance(value, Tensor)
        }

    def load_buffers(self, values: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
        """Build the kept optimizer for ``values`` (the tensors it trains, in training order)
        and give it ``buffers`` as :meth:`buffers` wrote them; ValueError for a buffer of a
        tensor it does not train."""
        if not buffers:
            return
        names = list(values)
        unknown = sorted({key.rsplit("/", 1)[0] for key in buffers} - set(names))
        if unknown:
            raise ValueError(f"optimizer buffers for unknown parameters {unknown}")
        params, optimizer = self.prepare(values)
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in buffers.items():
            name, field = key.rsplit("/", 1)
            state.setdefault(names.index(name), {})[field] = value.to(params[name].device)
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": state, "param_groups": groups})


class Client:
    """Client ``client_id``: trains on its data starting from what it received (the GLOBAL
    tensors and whatever else the server sends) and its own PERSONAL tensors, keeps the new
    PERSONAL tensors, and returns only what the method uploads."""

    def __init__(
        self,
        client_id: int,
        method: Method,
        data: ClientData,
        personal: Tensors,
        optimizers: Optimizers,
        seed: int,
    ) -> None:
        self.id = client_id
        self.method = method
        self.data = data
        self.personal = personal
        self.optimizers = optimizers
        self.seed = seed

    def params(self, global_tensors: Mapping[str, Tensor]) -> Tensors:
        """Every tensor this client trains and predicts with: the GLOBAL ones and its own
        PERSONAL ones, as the method merges them."""
        own = {**{k: global_tensors[k] for k in self.method.global_keys}, **self.personal}
        return self.method.merge(own)

    def batch_features(self, batch: Tensor, round: int, epoch: int, step: int) -> Tensor:
        """Image features of ``batch``: the stored view of this epoch (a fresh crop per epoch
        when views cover the run), or a fresh encoding for ``augment: online``."""
        if self.data.online is not None:
            seed = derive_seed(self.seed, "augment", round, self.id, epoch, step)
            return self.data.online(batch.cpu(), seed)
        views = self.data.train_features
        return views[(round * self.method.cfg.local_epochs + epoch) % views.shape[0]][batch]

    def steps(self, round: int) -> Iterator[tuple[int, int, Tensor]]:
        """(epoch, step, batch indices) of every step of local round ``round``: ``local_epochs``
        passes over the client's data, each in its own order drawn from the run seed."""
        cfg = self.method.cfg
        device = self.data.train_labels.device
        order_rng = torch_generator(self.seed, "order", round, self.id)
        for epoch in range(cfg.local_epochs):
            order = torch.randperm(self.data.num_train, generator=order_rng)
            for step, batch in enumerate(order.to(device).split(cfg.train_batch_size)):
                yield epoch, step, batch

    def outcome(
        self,
        params: Mapping[str, Tensor],
        received: Mapping[str, Tensor],
        round: int,
        losses: list[Tensor],
    ) -> tuple[Tensors, Update]:
        """The PERSONAL tensors to keep and the Update to send after training to ``params``."""
        generator = torch_generator(self.seed, "after-training", round, self.id)
        params = self.method.after_training(params, received, generator)
        kept = self.method.keep(params, received)
        upload = self.method.upload(params, received)
        if set(upload) != set(self.method.upload_keys):
            raise RuntimeError(
                f"method {self.method.name} uploads {sorted(upload)}, but declares "
                f"{sorted(self.method.upload_keys)}"
            )
        mean_loss = float(torch.stack(losses).mean()) if losses else 0.0
        tensors = {key: value.detach().clone() for key, value in upload.items()}
        update = Update(self.id, round, tensors, self.data.num_train, {"loss": mean_loss})
        return {key: value.detach().clone() for key, value in kept.items()}, update

    def train(
        self, received: Mapping[str, Tensor], round: int, deadline: float | None = None
    ) -> Update:
        """One local round (``local_epochs`` passes over the client's data) from ``received``.
        Past ``deadline`` (``time.monotonic()`` seconds), checked before every step, it stops
        with ClientTimeoutError and keeps its PERSONAL tensors as they were."""
        cfg = self.method.cfg
        if not self.method.trains:
            return Update(self.id, round, {}, self.data.num_train, {})
        params, optimizer = self.optimizers.prepare(self.params(received))
        losses = []
        for epoch, step, batch in self.steps(round):
            if deadline is not None and time.monotonic() > deadline:
                raise ClientTimeoutError(f"stopped after {len(losses)} steps")
            loss = self.method.loss(
                params,
                self.batch_features(batch, round, epoch, step),
                self.data.train_labels[batch],
                self.data.bank,
                received,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.detach())
        self.personal, update = self.outcome(params, received, round, losses)
        return update
