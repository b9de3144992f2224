"""Training differentiates through the routed experts: the inference MoE op has no backward, so the training
model routes through the plain reference (a kernel swapped in by mistake would leave the experts untrained)."""
from __future__ import annotations

import os

import torch

from twotower_ext.models import NemotronHConfig
from twotower_ext.train.model import TrainModel
from twotower_ext.train.trainer import diffusion_loss, lm_loss

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")


def test_gradients_reach_the_routed_experts_of_both_towers(gen):
    model = TrainModel(NemotronHConfig.from_json(PARITY))
    model.load(PARITY)
    ids = torch.randint(4, 512, (2, 33), generator=gen)
    loss = lm_loss(model, ids, 16) + diffusion_loss(model, ids[:, :32], 16, gen)
    loss.backward()
    for tower in (model.w.context, model.w.denoiser):
        moes = [layer.mixer for layer in tower.layers if layer.kind == "moe"]
        assert moes
        for m in moes:
            for t in (m.up, m.down):
                assert t.grad is not None and torch.isfinite(t.grad).all()
                used = t.grad.flatten(1).abs().sum(1) > 0     # per expert
                assert used.any(), "no routed expert received a gradient"
