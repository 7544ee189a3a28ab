"""The world model (issue 27): RSSM shapes, DreamerV3 loss arithmetic, overfitting a tiny fixed
dataset, named input errors, gradient routing in imagination, and the planners. No Ray."""

from __future__ import annotations

import math

import pytest
import torch
from ray.rllib.utils.torch_utils import symlog, two_hot

from vla_ray.config import ConfigError, VLAConfig
from vla_ray.tokenizer import encode_instructions
from vla_ray.world_model import RSSM, WorldModel, WorldModelConfig, WorldModelInputError
from vla_ray.world_model.imagination import (
    LatentActor,
    LatentCritic,
    actor_critic_losses,
    imagine,
)
from vla_ray.world_model.losses import (
    ReturnNormalizer,
    TwoHotHead,
    foreground_mask,
    kl_balance,
    lambda_returns,
    weighted_image_error,
)
from vla_ray.world_model.planner import PlannerConfig, latent_objective, plan

TINY = dict(deter=32, stoch=4, classes=4, hidden=32)


def small_vla() -> VLAConfig:
    """A 16 x 16-image VLA with a 2-value state and a one-layer LM."""
    return VLAConfig(
        image_size=(16, 16),
        state_dim=2,
        instruction_max_length=8,
        llm_config=dict(num_hidden_layers=1),
    )


def scene_batch(B: int = 4, T: int = 5, S: int = 16, seed: int = 0) -> dict:
    """A moving bright square on a per-sequence background; reward a linear function of the
    square's position (so it is predictable from the latent state)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = encode_instructions(["go to the red ball", "go to the blue ball"] * (B // 2), 8)
    ids = torch.as_tensor(ids)[:, None].expand(B, T, 8)
    mask = torch.as_tensor(mask)[:, None].expand(B, T, 8)
    p = torch.rand(B, 2, generator=g) * 0.6 + 0.2
    acts = torch.rand(B, T, 2, generator=g) * 2 - 1
    bg = torch.randint(0, 120, (B, 3), generator=g)
    states, images = [], []
    for t in range(T):
        if t > 0:
            p = (p + 0.15 * acts[:, t]).clamp(0.1, 0.9)
        states.append(p.clone())
        im = bg[:, None, None, :].expand(B, S, S, 3).clone()
        for b in range(B):
            x, y = (p[b] * S).long().clamp(2, S - 3)
            im[b, y - 2 : y + 2, x - 2 : x + 2] = 255
        images.append(im.to(torch.uint8))
    state = torch.stack(states, 1)
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    return dict(
        obs=dict(image=torch.stack(images, 1), state=state, instruction=ids, instruction_mask=mask),
        prev_actions=acts * (1 - is_first[..., None]),
        rewards=3 * state[..., 0] - 2 * state[..., 1],
        continues=torch.ones(B, T),
        is_first=is_first,
    )


@pytest.fixture(scope="module")
def state_wm() -> WorldModel:
    """A state-only (vision='none') tiny world model."""
    torch.manual_seed(0)
    return WorldModel(
        VLAConfig(vision="none", state_dim=2, instruction_max_length=8),
        WorldModelConfig(**TINY, decode=("state",), horizon=4),
    )


def test_rssm_shapes_and_straight_through():
    rssm = RSSM(embed_dim=10, action_dim=3, deter=12, stoch=4, classes=5, hidden=16)
    B, T = 2, 6
    embed = torch.randn(B, T, 10, requires_grad=True)
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    states, post, prior = rssm.observe(embed, torch.randn(B, T, 3), is_first)
    assert states.h.shape == (B, T, 12) and states.z.shape == (B, T, 4, 5)
    assert post.shape == prior.shape == (B, T, 4, 5)
    assert states.features().shape == (B, T, 12 + 20) and rssm.feature_dim == 32
    # z is one-hot in value (each categorical sums to 1 with a single 1) ...
    assert torch.allclose(states.z.sum(-1), torch.ones(B, T, 4))
    assert torch.allclose(states.z.detach().max(-1).values, torch.ones(B, T, 4))
    assert torch.count_nonzero(states.z.detach() > 0.5) == B * T * 4
    # ... and straight-through: its gradient is that of the posterior probabilities
    states.z.sum().backward()  # d(sum of onehot + p - sg(p))/dp = 1 per entry: sums to 0
    assert embed.grad is not None
    nxt, probs = rssm.img_step(states.flatten().detach(), torch.zeros(B * T, 3))
    assert nxt.h.shape == (B * T, 12) and probs.shape == (B * T, 4, 5)


def test_kl_balance_and_free_bits_match_hand_computed_values():
    post = torch.tensor([[[0.5, 0.5]]], requires_grad=True)  # (N=1, S=1, C=2)
    prior = torch.tensor([[[0.9, 0.1]]], requires_grad=True)
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.510826
    out = kl_balance(post, prior, free_nats=0.1, dyn_scale=0.5, rep_scale=0.1)
    assert out["kl"].item() == pytest.approx(kl, abs=1e-5)
    assert out["loss"].item() == pytest.approx(0.6 * kl, abs=1e-5)
    # dyn trains only the prior, rep only the posterior
    out["dyn"].sum().backward()
    assert post.grad is None and prior.grad is not None
    # below the free bits both terms are clipped to free_nats: constant, no gradient
    clipped = kl_balance(post, prior, free_nats=1.0, dyn_scale=0.5, rep_scale=0.1)
    assert clipped["loss"].item() == pytest.approx(0.5 * 1.0 + 0.1 * 1.0)
    prior.grad = None
    clipped["loss"].sum().backward()
    assert torch.count_nonzero(prior.grad) == 0 and torch.count_nonzero(post.grad) == 0
    # two categoricals: the KL sums over them
    two = kl_balance(post.detach().expand(1, 2, 2), prior.detach().expand(1, 2, 2), 0.0)
    assert two["kl"].item() == pytest.approx(2 * kl, abs=1e-5)


def test_lambda_returns_two_hot_and_return_scale():
    # H=2: R2 = v2 = 4; R1 = 2 + .5*(.5*4 + .5*4) = 4; R0 = 1 + .5*(.5*3 + .5*4) = 2.75
    r = lambda_returns(
        torch.tensor([[0.0], [1.0], [2.0]]),
        torch.ones(3, 1),
        torch.tensor([[0.0], [3.0], [4.0]]),
        gamma=0.5,
        lambda_=0.5,
    )
    assert r.squeeze(-1).tolist() == pytest.approx([2.75, 4.0])
    # a terminal state (continue 0) cuts the bootstrap: R0 = r1 = 1
    r = lambda_returns(
        torch.tensor([[0.0], [1.0], [2.0]]),
        torch.tensor([[1.0], [0.0], [1.0]]),
        torch.tensor([[0.0], [3.0], [4.0]]),
        0.5,
        0.5,
    )
    assert r[0].item() == pytest.approx(1.0)
    norm = ReturnNormalizer(decay=0.0)
    norm.update(torch.linspace(0, 100, 1001))
    assert norm.scale().item() == pytest.approx(90.0, abs=0.01)
    norm.update(torch.linspace(0, 0.1, 101))  # small returns are not amplified
    assert norm.scale().item() == 1.0
    # the prediction decodes the two-hot encoding of symlog(target) back to the target
    head = TwoHotHead(1, 255, -20.0, 20.0)
    for target in (-7.0, 0.3, 42.0):
        code = two_hot(symlog(torch.tensor([target])), 255, -20.0, 20.0)[0]
        head.linear.bias.data = torch.log(code + 1e-12)
        assert head(torch.zeros(1, 1)).item() == pytest.approx(target, rel=1e-3)
        exact = head.loss(torch.zeros(1, 1), torch.tensor([target])).item()
        head.linear.bias.data = torch.zeros(255)
        assert head.loss(torch.zeros(1, 1), torch.tensor([target])).item() > exact + 1.0


def test_foreground_weighted_image_error_matches_hand_computed_values():
    # 3 frames of 4x4: grey floor, a black static border column, one bright pixel per frame
    # at a different place (an object that moves): the per-pixel median is the floor + border
    target = torch.full((3, 4, 4, 3), -0.2)
    target[:, :, 0] = -0.5
    for i, (y, x) in enumerate([(1, 1), (2, 3), (3, 2)]):
        target[i, y, x] = torch.tensor([0.5, -0.5, -0.5])
    fg = foreground_mask(target)
    assert fg.shape == (3, 4, 4)
    assert fg.sum().item() == 3 and fg[0, 1, 1] == fg[1, 2, 3] == fg[2, 3, 2] == 1
    pred = torch.full_like(target, -0.2)  # the floor everywhere: right on 12 of 16 pixels
    # per-pixel channel-mean errors: border 0.09, object (0.49 + 0.09 + 0.09) / 3
    border, obj = 0.3**2, (0.7**2 + 2 * 0.3**2) / 3
    out = weighted_image_error(pred, target, fg_weight=10.0)
    assert torch.allclose(out["loss"], torch.full((3,), 3 * (10 * obj + 4 * border)))
    assert torch.allclose(out["fg_mse"], torch.full((3,), obj))
    assert torch.allclose(out["bg_mse"], torch.full((3,), 4 * border / 15))
    assert torch.allclose(out["mse"], torch.full((3,), (obj + 4 * border) / 16))
    assert torch.allclose(out["fg_fraction"], torch.full((3,), 1 / 16))
    # fg_weight=1 is the plain summed squared error
    plain = weighted_image_error(pred, target)["loss"]
    assert torch.allclose(plain, ((pred - target) ** 2).sum((1, 2, 3)))
    # an explicit background overrides the batch median: the object pixels of frame 0 only
    bg = target[1].clone()
    assert foreground_mask(target[:1], background=bg).sum().item() == 2
    with pytest.raises(ConfigError, match="world_model.image_fg_weight.*got 0.5"):
        WorldModelConfig(image_fg_weight=0.5)


def test_keypoint_reconstruction_loss_reaches_the_encoder_decoder():
    torch.manual_seed(0)
    wm = WorldModel(
        VLAConfig(
            image_size=(16, 16),
            state_dim=2,
            instruction_max_length=8,
            vision="cnn",
            vision_config={"tokens": "keypoints", "recon_coeff": 1.0},
            llm_config=dict(num_hidden_layers=1),
        ),
        WorldModelConfig(**TINY, image_fg_weight=5.0),
    )
    loss, metrics, _ = wm.loss(scene_batch(B=2, T=3))
    loss.backward()
    assert metrics["keypoint_recon"] > 0
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in wm.trunk.vision.recon.parameters()
    )


def test_cnn_image_encoder_gives_the_posterior_a_direct_pixel_path():
    torch.manual_seed(0)
    vla = small_vla()
    wm = WorldModel(vla, WorldModelConfig(**TINY, image_encoder="trunk+cnn", cnn_depth=4))
    assert wm.image_encoder is not None
    # the trunk's features, then the CNN's: 16 -> 8 -> 4 pixels, 4 then 8 channels, flattened
    E = wm.trunk.feature_dim + 8 * 4 * 4
    batch = scene_batch(B=2, T=3)
    embed = wm.encode(batch["obs"])
    assert embed.shape == (2, 3, E)
    # a few pixels changed (a small object moved) change the CNN's features
    moved = {k: v.clone() for k, v in batch["obs"].items()}
    moved["image"][0, 0, :3, :3] = 255 - moved["image"][0, 0, :3, :3]
    diff = (wm.encode(moved) - embed)[0, 0, wm.trunk.feature_dim :]
    assert diff.abs().max() > 1e-3
    loss, _, _ = wm.loss(batch)
    loss.backward()
    conv = wm.image_encoder.net[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    with pytest.raises(
        ConfigError, match="image_encoder: unknown name 'cnn'; valid names are trunk, trunk\\+cnn"
    ):
        WorldModelConfig(image_encoder="cnn")
    with pytest.raises(ConfigError, match="image_encoder: 'trunk\\+cnn' needs an 'image'"):
        WorldModel(
            VLAConfig(vision="none", state_dim=2, instruction_max_length=8),
            WorldModelConfig(**TINY, decode=("state",), image_encoder="trunk+cnn"),
        )


def test_cnn_embed_dim_projects_and_normalises_the_cnn_features():
    torch.manual_seed(0)
    vla = small_vla()
    batch = scene_batch(B=2, T=3)
    flat = WorldModel(vla, WorldModelConfig(**TINY, image_encoder="trunk+cnn", cnn_depth=4))
    assert flat.cnn_proj is None  # the default: the CNN's 8 x 4 x 4 flat features as they are
    assert flat.encode(batch["obs"]).shape == (2, 3, flat.trunk.feature_dim + 128)
    wm = WorldModel(
        vla, WorldModelConfig(**TINY, image_encoder="trunk+cnn", cnn_depth=4, cnn_embed_dim=5)
    )
    D = wm.trunk.feature_dim
    embed = wm.encode(batch["obs"])
    assert embed.shape == (2, 3, D + 5)
    assert wm.rssm.post_mlp._net[0].in_features == 32 + D + 5  # deter + embed
    # the projected CNN features are layer-normed: zero mean, unit variance per step
    cnn = embed[..., D:]
    assert cnn.mean(-1).abs().max() < 1e-4
    assert cnn.var(-1, unbiased=False).sub(1).abs().max() < 1e-2
    # the loss's gradient reaches the CNN through the projection
    loss, _, _ = wm.loss(batch)
    loss.backward()
    assert wm.image_encoder.net[0].weight.grad.abs().sum() > 0
    assert wm.cnn_proj[0].weight.grad.abs().sum() > 0
    for bad in (-1, 2.5, "8"):
        with pytest.raises(
            ConfigError,
            match=f"world_model.cnn_embed_dim: expected an integer >= 0, got {bad!r}",
        ):
            WorldModelConfig(image_encoder="trunk+cnn", cnn_embed_dim=bad)
    with pytest.raises(
        ConfigError,
        match="world_model.cnn_embed_dim: projects the CNN's features, expected 0 with "
        "image_encoder='trunk' \\(or image_encoder='trunk\\+cnn'\\), got 8",
    ):
        WorldModelConfig(cnn_embed_dim=8)


def test_world_model_overfits_a_tiny_fixed_dataset():
    torch.manual_seed(0)
    batch = scene_batch(B=2, T=4)
    wm = WorldModel(
        small_vla(),
        WorldModelConfig(**TINY),
    )
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(wm.parameters(), lr=1e-2)
    first = None
    for _ in range(80):  # ~2.6 s on a lightly loaded 2-core CPU
        loss, metrics, _ = wm.loss(batch, generator=g)
        first = first or metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    pixel_var = (batch["obs"]["image"].float() / 255).var().item()  # MSE of the mean image
    reward_std = batch["rewards"].std().item()
    assert first["image_mse"] > pixel_var  # starts worse than the mean image
    assert metrics["image_mse"] < 0.4 * pixel_var, (metrics, pixel_var)
    assert metrics["reward_mae"] < 0.4 * reward_std, (metrics, reward_std)
    assert metrics["state_mse"] < 0.1 * first["state_mse"]
    assert metrics["continue_bce"] < 0.05


def test_latent_objective_trains_without_decoders(state_wm):
    wm = WorldModel(
        state_wm.vla_config, WorldModelConfig(**TINY, objective="latent"), trunk=state_wm.trunk
    )
    assert len(wm.decoders) == 0 and wm.latent_head is not None
    batch = scene_batch()
    del batch["obs"]["image"]
    loss, metrics, post = wm.loss(batch)
    assert "latent_loss" in metrics and "image_mse" not in metrics
    assert post.features().shape == (4, 5, wm.rssm.feature_dim)
    loss.backward()
    assert wm.latent_head[1].weight.grad is not None


def test_bad_input_names_the_missing_key(state_wm):
    image_wm = WorldModel(
        VLAConfig(image_size=(16, 16), state_dim=2, instruction_max_length=8),
        WorldModelConfig(**TINY),
    )
    batch = scene_batch()
    del batch["obs"]["image"]
    with pytest.raises(WorldModelInputError, match="'image' is missing.*encoder"):
        image_wm.loss(batch)
    batch = scene_batch()
    del batch["rewards"]
    with pytest.raises(WorldModelInputError, match="'rewards' is missing.*predict_reward"):
        state_wm.loss(batch)
    no_reward = WorldModel(
        state_wm.vla_config,
        WorldModelConfig(**TINY, decode=("state",), predict_reward=False),
        trunk=state_wm.trunk,
    )
    loss, metrics, _ = no_reward.loss(batch)  # the same batch is fine without a reward head
    assert "reward_mae" not in metrics and torch.isfinite(loss)


@pytest.mark.parametrize("actor_grad", ["reinforce", "dynamics"])
def test_imagination_gradients_go_only_where_intended(state_wm, actor_grad):
    torch.manual_seed(0)
    cfg = WorldModelConfig(**TINY, decode=("state",), horizon=4, actor_grad=actor_grad)
    F = state_wm.rssm.feature_dim
    actor = LatentActor(F, 2, 32)
    critic = LatentCritic(F, cfg)
    batch = scene_batch()
    del batch["obs"]["image"]
    start = state_wm.filter(batch).flatten()
    rollout = imagine(state_wm, actor, start, cfg.horizon, actor_grad, torch.Generator())
    assert rollout.features.shape == (5, 20, F) and rollout.actions.shape == (4, 20, 2)
    assert rollout.actions.abs().max() <= 1.0
    actor_loss, critic_loss, metrics = actor_critic_losses(
        rollout, actor, critic, ReturnNormalizer(), cfg
    )
    state_wm.zero_grad(set_to_none=True)
    actor_loss.backward(retain_graph=True)
    # the actor loss never reaches the world model or the critic
    assert all(p.grad is None for p in state_wm.parameters())
    assert all(p.grad is None for p in critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
    # through the dynamics only when configured
    assert rollout.features[1:].requires_grad == (actor_grad == "dynamics")
    critic_loss.backward()
    assert all(p.grad is None for p in state_wm.parameters())
    assert all(p.grad is not None for p in critic.trainable())
    assert all(p.grad is None for p in critic.slow.parameters())
    assert set(metrics) >= {"actor_loss", "critic_loss", "imagined_return", "return_scale"}


@pytest.mark.parametrize("name", ["cem", "mppi"])
def test_planner_stays_in_bounds_and_beats_random_shooting(name):
    H, A = 6, 3
    target = torch.tensor([0.6, -0.3, 1.7])  # the last dim's optimum lies outside the box

    def objective(actions):
        return -((actions - target) ** 2).sum((-1, -2))

    cfg = PlannerConfig(horizon=H, iterations=10, num_samples=64, num_elites=8)
    best_possible = objective(target.clamp(-1, 1).expand(1, H, A))[0]
    wins = 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ours = plan(name, objective, A, -1.0, 1.0, cfg, generator=g)
        rand = plan("random", objective, A, -1.0, 1.0, cfg, generator=g)
        assert ours.shape == (H, A) and ours.min() >= -1.0 and ours.max() <= 1.0
        gap_ours = (best_possible - objective(ours[None])[0]).item()
        gap_rand = (best_possible - objective(rand[None])[0]).item()
        wins += gap_ours < 0.35 * gap_rand
    assert wins == 3
    # warm-started at the optimum, it keeps it
    warm = target.clamp(-1, 1).expand(H, A)
    kept = plan(name, objective, A, -1.0, 1.0, cfg, warm_start=warm, generator=g)
    assert objective(kept[None])[0] == pytest.approx(best_possible.item(), abs=1e-6)


def test_latent_planning_returns_an_action_in_bounds(state_wm):
    batch = scene_batch()
    del batch["obs"]["image"]
    start = state_wm.filter(batch)
    row = type(start)(start.h[0, -1:], start.z[0, -1:])
    F = state_wm.rssm.feature_dim
    critic = LatentCritic(F, WorldModelConfig(**TINY))
    objective = latent_objective(state_wm, critic, row, gamma=0.99)
    acts = torch.rand(5, 4, 2) * 2 - 1
    assert torch.equal(objective(acts), objective(acts))  # common random numbers
    cfg = PlannerConfig(horizon=4, iterations=2, num_samples=16, num_elites=4)
    actor = LatentActor(F, 2, 32)
    warm = actor.mode(row.features()).expand(4, 2)
    for name in ("cem", "mppi"):
        out = plan(name, objective, 2, -1.0, 1.0, cfg, warm_start=warm)
        assert out.shape == (4, 2) and out.abs().max() <= 1.0


# each loss weight, a value other than 1, its term's metric and the term per unit of that metric:
# the image term sums the error over 16 x 16 pixels x 3 channels, the state term over its 2 values
LOSS_WEIGHTS = [
    ("image_scale", 0.25, "image_mse", 16 * 16 * 3, "state_mse"),
    ("state_scale", 10.0, "state_mse", 2, "image_mse"),
]


@pytest.mark.parametrize(("name", "scale", "metric", "size", "other"), LOSS_WEIGHTS)
def test_a_loss_weight_scales_only_its_own_term(name, scale, metric, size, other):
    vla = small_vla()
    batch = scene_batch(B=2, T=3)
    totals = {}
    for value in (1.0, scale):
        torch.manual_seed(0)
        wm = WorldModel(vla, WorldModelConfig(**TINY, **{name: value}))
        loss, metrics, _ = wm.loss(batch, generator=torch.Generator().manual_seed(1))
        totals[value] = (loss.item(), metrics)
    (l1, m1), (ls, ms) = totals[1.0], totals[scale]
    assert m1[metric] == pytest.approx(ms[metric])  # same model, same error
    assert m1[other] == pytest.approx(ms[other])
    assert ls - l1 == pytest.approx((scale - 1) * size * m1[metric], rel=1e-4)
    for bad in (0, -1.0, "1", True):
        with pytest.raises(
            ConfigError, match=f"world_model.{name}: expected a number > 0, got {bad!r}"
        ):
            WorldModelConfig(**{name: bad})
