"""A client: its own data, its PERSONAL tensors, and local training that returns an Update."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.features import OnlineViews
from ..evaluation import EvalSet
from ..methods import Method, Tensors
from ..prompts import PromptBank
from ..seeding import derive_seed, torch_generator
from .update import Update


@dataclass
class ClientData:
    """Frozen image features of one client. ``train_features`` is (views, n, E); labels index
    into ``local.bank``, the client's label space (all base classes, or its own). With
    ``online`` set (``augment: online``) every batch is augmented and encoded afresh instead,
    and ``train_features`` holds no view."""

    train_features: Tensor
    train_labels: Tensor
    local: EvalSet
    online: OnlineViews | None = None

    @property
    def bank(self) -> PromptBank:
        return self.local.bank

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])


class Optimizers:
    """SGD for local rounds. ``fresh`` builds one per local round (the default); ``shared``
    keeps one optimizer, and so its momentum, across clients and rounds as the authors'
    code does."""

    def __init__(self, mode: str, lr: float, momentum: float, weight_decay: float) -> None:
        self.mode = mode
        self.hyper = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._params: dict[str, Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None

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

    def state_dict(self) -> dict:
        """The shared optimizer's state (empty for ``fresh``), for checkpoints."""
        return {} if self._optimizer is None else self._optimizer.state_dict()


class Client:
    """Client ``client_id``: trains on its data starting from the received GLOBAL tensors and
    its own PERSONAL tensors, keeps the new PERSONAL tensors, and returns only the GLOBAL ones."""

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
        """Every tensor this client predicts with: the GLOBAL ones and its own PERSONAL ones."""
        return {**global_tensors, **self.personal}

    def _batch_features(self, batch: Tensor, round: int, epoch: int, step: int) -> Tensor:
        """Image features of ``batch``: the stored view of this epoch (a fresh crop per epoch
        when views cover the run), or a fresh encoding for ``augment: online``."""
        if self.data.online is not None:
            seed = derive_seed(self.seed, "augment", round, self.id, epoch, step)
            return self.data.online(batch.cpu(), seed)
        views = self.data.train_features
        return views[(round * self.method.cfg.local_epochs + epoch) % views.shape[0]][batch]

    def train(self, global_tensors: Mapping[str, Tensor], round: int) -> Update:
        """One local round (``local_epochs`` passes over the client's data)."""
        cfg = self.method.cfg
        if not self.method.trains:
            return Update.from_params(self.id, round, {}, (), self.data.num_train, {})
        params, optimizer = self.optimizers.prepare(self.params(global_tensors))
        device = self.data.train_labels.device
        order_rng = torch_generator(self.seed, "order", round, self.id)
        losses = []
        for epoch in range(cfg.local_epochs):
            order = torch.randperm(self.data.num_train, generator=order_rng)
            for step, batch in enumerate(order.to(device).split(cfg.train_batch_size)):
                loss = self.method.loss(
                    params,
                    self._batch_features(batch, round, epoch, step),
                    self.data.train_labels[batch],
                    self.data.bank,
                    global_tensors,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                optimizer.step()
                losses.append(loss.detach())
        self.personal = {key: params[key].detach().clone() for key in self.method.personal_keys}
        mean_loss = float(torch.stack(losses).mean()) if losses else 0.0
        return Update.from_params(
            self.id,
            round,
            params,
            self.method.global_keys,
            self.data.num_train,
            {"loss": mean_loss},
        )
