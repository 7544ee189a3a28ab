"""The flow-matching action head: shapes, determinism, learning a regression, its settings."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vla_ray.models.heads import HEADS, FlowMatchingHead, build_head, takes_noise


def test_flow_head_is_registered_and_takes_noise():
    assert HEADS["flow_matching"] is FlowMatchingHead
    assert takes_noise("flow_matching") and takes_noise("diffusion")
    assert not any(takes_noise(h) for h in ("mlp", "gaussian", "tanh_gaussian", "transformer"))
    head = build_head("flow_matching", 8, 2, 4, -1.0, 1.0, inference_steps=3)
    assert head.inference_steps == 3


def test_flow_head_shapes_and_bounds_with_chunks():
    torch.manual_seed(0)
    head = FlowMatchingHead(8, action_dim=3, chunk_size=4, low=-2.0, high=5.0, hidden=32)
    feats = torch.randn(5, 8)
    for deterministic in (True, False):
        out = head.predict(feats, deterministic=deterministic)
        assert out.shape == (5, 4, 3)
        assert out.min() >= -2.0 and out.max() <= 5.0
    # large noise is clamped to the bounds after the last step
    assert head.sample(feats, torch.full((5, 12), 100.0)).eq(5.0).all()
    assert head.sample(feats, torch.zeros(5, 12), steps=2).shape == (5, 4, 3)
    loss = head.loss(feats, torch.rand(5, 4, 3) * 7 - 2)
    assert loss.shape == () and torch.isfinite(loss)


def test_flow_head_is_deterministic_with_zero_noise_and_reproducible_given_noise():
    torch.manual_seed(0)
    head = FlowMatchingHead(8, action_dim=2, chunk_size=3, low=-1.0, high=1.0, hidden=32)
    feats = torch.randn(6, 8)
    noise = torch.randn(6, 6)
    torch.testing.assert_close(head.predict(feats), head.predict(feats), rtol=0, atol=0)
    torch.testing.assert_close(head.predict(feats), head.sample(feats, torch.zeros(6, 6)))
    torch.testing.assert_close(head.sample(feats, noise), head.sample(feats, noise))
    assert not torch.allclose(head.sample(feats, noise), head.predict(feats), atol=1e-3)
    # one Euler step from t = 1: x = noise - v(noise, 1)
    t1 = torch.ones(6)
    one = (noise - head.velocity(noise, t1, feats)).clamp(-1, 1).view(6, 3, 2)
    torch.testing.assert_close(head.sample(feats, noise, steps=1), one)


def test_flow_head_loss_regresses_the_velocity_from_data_to_noise():
    """x_t = t * eps + (1 - t) * x0 in unit space (t = 1 is noise), target u = eps - x0."""
    torch.manual_seed(0)
    head = FlowMatchingHead(8, action_dim=2, chunk_size=2, low=-3.0, high=1.0, hidden=32)
    feats, actions = torch.randn(7, 8), torch.rand(7, 2, 2) * 4 - 3
    torch.manual_seed(123)
    loss = head.loss(feats, actions)
    torch.manual_seed(123)  # the same draws, in the head's order: noise, then times
    x0 = (actions.flatten(1) + 3.0) / 2.0 - 1.0
    eps = torch.randn_like(x0)
    t = head.sample_time(7)
    x_t = t[:, None] * eps + (1 - t[:, None]) * x0
    expected = F.mse_loss(head.velocity(x_t, t, feats), eps - x0)
    torch.testing.assert_close(loss, expected)


def test_flow_head_training_times_follow_beta_on_the_interval():
    torch.manual_seed(0)
    head = FlowMatchingHead(4, action_dim=1, chunk_size=1, low=-1.0, high=1.0)
    t = head.sample_time(20_000)
    assert t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1) has mean 0.6; rescaled to [0.001, 1]: 0.001 + 0.999 * 0.6
    assert abs(float(t.mean()) - (0.001 + 0.999 * 0.6)) < 0.01
    assert float((t > 0.5).float().mean()) > 0.6  # weighted toward the noisy end


def test_flow_head_learns_a_regression_and_sampling_reproduces_targets():
    """Measured over torch seeds 0-19 (1000 Adam steps): the last losses are at most 0.061 of the
    first and deterministic sampling is within 0.151 mean / 0.64 max absolute error of the
    targets (range 5); the thresholds below leave about 1.6-2.5x margin."""
    torch.manual_seed(0)
    head = FlowMatchingHead(8, action_dim=2, chunk_size=3, low=-2.0, high=3.0, hidden=128)
    feats = torch.randn(16, 8)
    target = torch.tanh(feats[:, :6]).view(16, 3, 2) * 2.0 + 0.5
    with torch.no_grad():
        err_before = (head.predict(feats) - target).abs().mean()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(1000):
        opt.zero_grad()
        loss = head.loss(feats, target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.15 * first
    with torch.no_grad():
        err = (head.predict(feats) - target).abs()
        mse = F.mse_loss(head.predict(feats), target)
    assert err.mean() < 0.25 and err.max() < 1.0, (err.mean(), err.max())
    assert err.mean() < 0.25 * err_before and mse < 0.1


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_flow_head_rejects_bad_inference_steps(steps):
    with pytest.raises(ValueError, match=r"head_config\.inference_steps: expected an integer >= 1"):
        FlowMatchingHead(8, action_dim=2, chunk_size=1, low=-1.0, high=1.0, inference_steps=steps)
    with pytest.raises(ValueError, match=f"got {steps!r}"):
        FlowMatchingHead(8, action_dim=2, chunk_size=1, low=-1.0, high=1.0, inference_steps=steps)
