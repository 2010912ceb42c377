"""Fixtures shared by the method tests (the tiny base folder: tests/steps/train/conftest.py): one fixed batch, a short
training loop over it and the logits a model gives on it (on the model's device)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today? I am fine, thanks."]


@pytest.fixture(scope="session")
def batch(tiny_model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


@pytest.fixture
def train(batch) -> Callable[[Any], list[float]]:
    """``train(model)`` runs 8 AdamW steps on the fixed batch and returns the losses."""

    def run(model: Any, steps: int = 8, lr: float = 1e-2) -> list[float]:
        torch.manual_seed(0)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        inputs = {k: v.to(model.device) for k, v in batch.items()}
        losses = []
        for _ in range(steps):
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    return run


@pytest.fixture
def logits(batch) -> Callable[[Any], torch.Tensor]:
    """``logits(model)``: eval-mode logits on the fixed batch."""

    def run(model: Any) -> torch.Tensor:
        model.eval()
        inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return model(**inputs).logits.float().cpu()

    return run

