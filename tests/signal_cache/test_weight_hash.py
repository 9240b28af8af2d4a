"""Teacher weights are hashed one way (signal_cache/fingerprint.py): the signal cache, MergeDistill's top-k cache and
checkpoints walk the weights with the same helper; checkpoints keep the layout they have always recorded."""

import hashlib

import pytest
import torch

from ki_trainer import checkpoints
from ki_trainer.signal_cache import fingerprint


class Odd(torch.nn.Module):
    """Weights of several dtypes, a non-contiguous one and an empty one."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(3, 4, generator=g).t())  # non-contiguous
        self.register_buffer("b", torch.randn(5, generator=g).to(torch.bfloat16))
        self.register_buffer("c", torch.arange(6, dtype=torch.int64))
        self.register_buffer("empty", torch.zeros(0))


def digest_as_checkpoints_wrote_it(model) -> str:
    """checkpoints.weights_digest as written before it used the shared helper (an independent copy)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        hasher.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return hasher.hexdigest()[:20]


def test_checkpoints_record_the_one_helpers_digest_with_their_earlier_value():
    model = Odd()
    assert checkpoints.weights_digest is fingerprint.weights_digest
    assert checkpoints.weights_digest(model) == digest_as_checkpoints_wrote_it(model)  # old checkpoints still match


def test_the_digest_follows_every_weight_and_the_layouts_differ():
    model = Odd()
    before = fingerprint.weights_digest(model)
    with torch.no_grad():
        model.c[5] = 7
    assert fingerprint.weights_digest(model) != before
    signals, checkpoint = hashlib.sha256(), hashlib.sha256()
    fingerprint.hash_state_dict(signals.update, model)
    fingerprint.hash_state_dict(checkpoint.update, model, layout="checkpoint")
    assert signals.hexdigest() != checkpoint.hexdigest()
    with pytest.raises(ValueError, match="layout must be"):
        fingerprint.hash_state_dict(signals.update, model, layout="other")
