"""The EMA self-ensemble: a buffer copy invisible to optimizers, the update rule, filling EMA
weights a checkpoint lacks."""

import torch
from torch import nn

from kd_det.modeling.online.ema import buffer_copy, ema_update, fill_missing_ema


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_buffer_copy_is_saved_but_not_trained():
    net = _net()
    ema = buffer_copy(net)
    assert list(ema.parameters()) == [] and not ema.training
    assert ema.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v), k


def test_update_averages_weights_and_statistics_and_copies_counters():
    net = _net()
    ema = buffer_copy(net)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    net.train()
    net(torch.randn(4, 3))  # BatchNorm statistics and counter move
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema_update(net, ema, 0.75)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * before[k] + 0.25 * net.state_dict()[k]), k
        else:
            assert torch.equal(v, net.state_dict()[k]), k


def test_missing_ema_weights_start_from_the_model():
    state = {"m.peers.0.w": torch.ones(1), "m.ema_peers.0.b": torch.zeros(1)}
    filled = fill_missing_ema(state, ["w", "b"], "m.", "ema_peers.0.", "peers.0.")
    assert filled == 1 and torch.equal(state["m.ema_peers.0.w"], torch.ones(1))
    assert torch.equal(state["m.ema_peers.0.b"], torch.zeros(1))  # present keys are kept


def test_update_is_bit_identical_to_the_per_tensor_rule_in_few_calls(monkeypatch):
    """The batched update computes exactly ``e.mul_(d).add_(p, alpha=1 - d)`` per tensor (the
    golden values and resumed runs depend on it), with one foreach call per (device, dtype)
    group instead of two kernels per tensor, whatever the number of tensors."""
    torch.manual_seed(1)
    net = nn.Sequential(*[nn.Linear(5, 5) for _ in range(20)], nn.BatchNorm1d(5))
    ema = buffer_copy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    expected = {}
    for name, p in list(net.named_parameters()) + list(net.named_buffers()):
        e = dict(ema.named_buffers())[name]
        expected[name] = (
            e.clone().mul_(0.999).add_(p, alpha=1.0 - 0.999) if e.is_floating_point() else p
        )
    calls = []
    real_add = torch._foreach_add_
    monkeypatch.setattr(
        torch, "_foreach_add_", lambda *a, **k: calls.append(1) or real_add(*a, **k)
    )
    ema_update(net, ema, 0.999)
    assert len(calls) == 1
    for name, e in ema.named_buffers():
        assert torch.equal(e, expected[name]), name
