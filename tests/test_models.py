"""The VLA model parts: shapes of every combination, errors, caching, persistence, freezing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vla_ray.config import ACTION_HEADS, PROJECTORS, VISION_ENCODERS, ConfigError, VLAConfig
from vla_ray.models.heads import DiffusionHead, TransformerHead
from vla_ray.models.vla import VLA, ObservationError
from vla_ray.tokenizer import encode_instructions

B, K, A = 3, 2, 2


def make_obs(batch: int = B, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, mask = encode_instructions(
        ["reach the red target", "go to the blue ball", "reach the red target"][:batch]
        + ["stand up"] * max(0, batch - 3),
        16,
    )
    return dict(
        image=torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g),
        state=torch.randn(batch, 4, generator=g),
        instruction=torch.as_tensor(ids),
        instruction_mask=torch.as_tensor(mask),
    )


@pytest.mark.parametrize("vision,projector", list(itertools.product(VISION_ENCODERS, PROJECTORS)))
def test_forward_shapes_every_combination(vision, projector):
    obs = make_obs()
    torch.manual_seed(0)
    for head in ACTION_HEADS:
        cfg = VLAConfig(vision=vision, projector=projector, head=head, chunk_size=K, action_dim=A)
        model = VLA(cfg)
        features = model(obs)
        assert features.shape == (B, model.trunk.feature_dim), (vision, projector, head)
        assert torch.isfinite(features).all()
        actions = model.predict(obs)
        assert actions.shape == (B, K, A), (vision, projector, head)
        assert torch.isfinite(actions).all()
        target = torch.rand(B, K, A) * 2 - 1
        loss = model.head.loss(model(obs), target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.head.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), head
        if model.head.stochastic:
            assert model.head.dist_inputs(features).shape == (B, 2 * K * A)


@pytest.mark.parametrize(
    "field,value,valid",
    [
        ("vision", "resnet", "cnn, siglip, clip, dinov2"),
        ("projector", "qformer", "mlp, attention, perceiver"),
        ("head", "flow", "mlp, gaussian"),
    ],
)
def test_wrong_component_name_lists_valid_names(field, value, valid):
    with pytest.raises(ConfigError) as err:
        VLAConfig(**{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and valid in msg


def test_unknown_config_key_rejected():
    with pytest.raises(ConfigError, match="unknown VLA config key.*visoin"):
        VLAConfig.from_dict({"visoin": "cnn"})


def test_observation_mismatch_names_field_and_shapes():
    model = VLA(VLAConfig())
    obs = make_obs()
    bad = dict(obs, image=obs["image"][:, :32, :32])
    with pytest.raises(ObservationError) as err:
        model(bad)
    msg = str(err.value)
    assert "'image'" in msg and "(B, 64, 64, 3)" in msg and "(3, 32, 32, 3)" in msg
    with pytest.raises(ObservationError, match=r"'state'.*\(B, 4\).*\(3, 7\)"):
        model(dict(obs, state=torch.zeros(3, 7)))
    missing = {k: v for k, v in obs.items() if k != "instruction"}
    with pytest.raises(ObservationError, match="'instruction' is missing"):
        model(missing)
    with pytest.raises(ObservationError, match="dtype uint8"):
        model(dict(obs, image=obs["image"].float()))


def test_instruction_prefix_encoded_once_and_cache_tracks_weights():
    torch.manual_seed(0)
    model = VLA(VLAConfig())
    obs = make_obs(batch=6)  # 3 distinct instructions among 6 rows
    with torch.no_grad():
        cached = model(obs)
    assert len(model.trunk._prefix_cache) == 3
    with torch.enable_grad():
        uncached = model(obs)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-6)
    # every row equals a single-sample forward (no leakage between rows)
    with torch.no_grad():
        rows = torch.cat([model({k: v[i : i + 1] for k, v in obs.items()}) for i in range(6)])
    torch.testing.assert_close(cached, rows, rtol=1e-5, atol=1e-5)
    # after an optimizer step on the language model, the memo is invalidated
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.head.loss(model(obs), torch.zeros(6, 1, 2)).backward()
    opt.step()
    with torch.no_grad():
        after = model(obs)
    with torch.enable_grad():
        fresh = model(obs)
    assert not torch.allclose(after, cached)
    torch.testing.assert_close(after, fresh.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("vision,head", [("cnn", "gaussian"), ("siglip", "diffusion")])
def test_save_pretrained_roundtrip(tmp_path, vision, head):
    torch.manual_seed(0)
    model = VLA(VLAConfig(vision=vision, head=head, chunk_size=K, lora={"r": 4}))
    obs = make_obs()
    out = model.save_pretrained(tmp_path / "vla")
    assert {p.name for p in out.iterdir()} >= {"vla_config.json", "model.safetensors", "tokenizer"}
    loaded = VLA.from_pretrained(out)
    torch.testing.assert_close(loaded.predict(obs), model.predict(obs), rtol=0, atol=0)


def test_from_pretrained_paths_load_transformers_parts(tmp_path):
    """The real from_pretrained(path) code, on tiny models saved locally."""
    from transformers import (
        AutoModelForCausalLM,
        Qwen2Config,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    vis = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    vis.save_pretrained(tmp_path / "vision")
    lm = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    lm.save_pretrained(tmp_path / "llm")
    model = VLA(
        VLAConfig(
            vision="siglip", vision_path=str(tmp_path / "vision"), llm_path=str(tmp_path / "llm")
        )
    )
    torch.testing.assert_close(
        model.trunk.vision.model.get_input_embeddings().weight,
        vis.get_input_embeddings().weight,
    )
    assert model.trunk.hidden_size == 32
    assert model.predict(make_obs()).shape == (B, 1, 2)  # 64x64 input resized to 32x32
    # the saved directory no longer needs the source paths
    out = model.save_pretrained(tmp_path / "vla")
    cfg = VLAConfig.load(out / "vla_config.json")
    assert cfg.vision_path is None and cfg.llm_path is None
    torch.testing.assert_close(
        VLA.from_pretrained(out).predict(make_obs()), model.predict(make_obs())
    )


def test_freeze_switches_and_lora():
    model = VLA(VLAConfig(freeze_vision=True, freeze_llm=True))
    assert not any(p.requires_grad for p in model.trunk.vision.parameters())
    assert not any(p.requires_grad for p in model.trunk.lm.parameters())
    assert all(p.requires_grad for p in model.trunk.projector.parameters())
    lora = VLA(VLAConfig(lora={"r": 4, "alpha": 8}))
    trainable = [n for n, p in lora.trunk.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_diffusion_ddim_is_deterministic_given_noise_and_learns():
    torch.manual_seed(0)
    head = DiffusionHead(8, action_dim=2, chunk_size=3, low=-1, high=1, inference_steps=5)
    feats = torch.randn(16, 8)
    noise = torch.randn(16, 6)
    torch.testing.assert_close(head.sample(feats, noise), head.sample(feats, noise))
    target = torch.tanh(feats[:, :6]).view(16, 3, 2) * 0.8
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    before = float(torch.nn.functional.mse_loss(head.predict(feats).detach(), target))
    for _ in range(400):
        opt.zero_grad()
        head.loss(feats, target).backward()
        opt.step()
    after = float(torch.nn.functional.mse_loss(head.predict(feats).detach(), target))
    assert after < 0.5 * before


def test_transformer_head_bins_and_teacher_forcing():
    head = TransformerHead(8, action_dim=2, chunk_size=2, low=-1, high=1)
    assert head.bins == 256
    a = torch.tensor([[-1.0, -0.999], [0.0, 0.5], [0.999, 1.0]])
    tokens = head.tokenize(a)
    assert tokens.min() >= 0 and tokens.max() <= 255
    assert (head.detokenize(tokens) - a).abs().max() <= 2.0 / 256
    torch.manual_seed(0)
    feats = torch.randn(8, 8)
    target = torch.rand(8, 2, 2) * 2 - 1
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        head.loss(feats, target).backward()
        opt.step()
    assert (head.predict(feats) - target).abs().max() < 0.05


def test_shipped_tokenizer_is_the_trained_one():
    from vla_ray.tokenizer import build_task_tokenizer, load_tokenizer

    shipped = load_tokenizer()
    assert shipped.get_vocab() == build_task_tokenizer().get_vocab()
    ids, mask = encode_instructions(["Reach the RED target."], 8, shipped)
    assert ids.shape == (1, 8) and mask.sum() == 5
    assert shipped.decode(ids[0][mask[0] == 1]) == "reach the red target ."
    assert np.all(ids[0][mask[0] == 0] == shipped.pad_token_id)


def test_a_saved_tokenizer_does_not_keep_the_last_calls_padding(tmp_path):
    import json
    from copy import deepcopy

    from vla_ray.tokenizer import load_tokenizer, save_tokenizer

    tok = deepcopy(load_tokenizer())
    encode_instructions(["reach the red target"], 16, tok)  # leaves padding to 16 on the backend
    assert tok.backend_tokenizer.padding is not None
    save_tokenizer(tok, tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    assert tok.backend_tokenizer.padding["length"] == 16  # the live tokenizer is left as it was


class FixedFeatures(torch.nn.Module):
    """Stands in for the conv stack: always returns ``fmap``."""

    def __init__(self, fmap: torch.Tensor):
        super().__init__()
        self.fmap = fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmap


def test_keypoint_tokens_are_spatial_softmax_coordinates():
    from vla_ray.models.vision import CNNEncoder

    enc = CNNEncoder((64, 64), tokens="keypoints")
    assert enc.num_tokens == enc.hidden_size == 32
    assert enc(torch.zeros(2, 64, 64, 3, dtype=torch.uint8)).shape == (2, 32, 32)
    # a feature map peaked at grid cell (row 1, col 6) for every channel
    fmap = torch.zeros(1, 32, 8, 8)
    fmap[:, :, 1, 6] = 30.0
    enc.net = FixedFeatures(fmap)
    seen = {}
    enc.kp_proj.register_forward_hook(lambda mod, inp, out: seen.update(xy=inp[0]))
    enc(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    xy_peak = seen["xy"][0, :, :3]
    cell = torch.linspace(-1, 1, 8)
    torch.testing.assert_close(xy_peak[:, 0], cell[6].expand(32), atol=1e-4, rtol=0)  # x: column
    torch.testing.assert_close(xy_peak[:, 1], cell[1].expand(32), atol=1e-4, rtol=0)  # y: row
    torch.testing.assert_close(xy_peak[:, 2], torch.full((32,), 30.0))  # peak activation


def blob_scenes(n: int, seed: int) -> torch.Tensor:
    """(n, 64, 64, 3) uint8: a grey floor with a red and a green 8x8 square at random places."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((n, 64, 64, 3), 120, dtype=torch.uint8)
    for i in range(n):
        for colour in ((230, 30, 30), (30, 230, 30)):
            y, x = torch.randint(0, 56, (2,), generator=g).tolist()
            img[i, y : y + 8, x : x + 8] = torch.tensor(colour, dtype=torch.uint8)
    return img


def test_keypoint_reconstruction_loss_is_relative_error_and_learns():
    from vla_ray.models.vision import CNNEncoder

    torch.manual_seed(0)
    enc = CNNEncoder((64, 64), tokens="keypoints", recon_coeff=2.0)
    test = blob_scenes(64, seed=1)
    with torch.no_grad():
        enc.recon[-1].weight.zero_()
        enc.recon[-1].bias.zero_()
        # a decoder that predicts nothing (the mean image) scores 1, times the coefficient
        torch.testing.assert_close(enc.reconstruction_loss(test), torch.tensor(2.0))
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for step in range(200):
        loss = enc.reconstruction_loss(blob_scenes(32, seed=100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = enc.reconstruction_loss(test).item() / 2.0
    # 1.05 at the start; 0.97 when only the decoder learns (frozen conv stack): the keypoints
    # learn to place the moving squares
    assert after < 0.85, after
    plain = CNNEncoder((64, 64), tokens="keypoints")
    assert plain.recon is None
    with pytest.raises(ValueError, match="recon_coeff=0"):
        plain.reconstruction_loss(test)
    for bad in ({"tokens": "patches"}, {"film": True, "context_dim": 8}):
        with pytest.raises(ValueError, match="vision_config.recon_coeff"):
            CNNEncoder((64, 64), recon_coeff=1.0, **{"tokens": "keypoints", **bad})
    # one image is its own mean: nothing moves, the error is the decoder's output, not divided
    one = enc.reconstruction_loss(test[:1])
    assert torch.isfinite(one) and one.item() < 10.0
    with pytest.raises(ValueError, match="multiple of 16"):
        CNNEncoder((40, 40), tokens="keypoints", recon_coeff=1.0)


def test_reconstruction_loss_reuses_the_training_forwards_cnn_pass():
    import copy

    from vla_ray.models.vision import CNNEncoder

    torch.manual_seed(0)
    enc = CNNEncoder((64, 64), tokens="keypoints", recon_coeff=0.5)
    passes = []
    enc.net.register_forward_hook(lambda *_: passes.append(1))
    images = blob_scenes(8, seed=3)

    def step(reuse: bool) -> tuple[float, list[torch.Tensor]]:
        enc.zero_grad()
        tokens = enc(images)
        if not reuse:
            enc._last_keypoints = None  # what the loss did before: a second CNN pass
        loss = tokens.square().mean() + enc.reconstruction_loss(images.reshape(-1, 64, 64, 3))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    fresh_loss, fresh_grads = step(reuse=False)
    assert len(passes) == 2
    passes.clear()
    loss, grads = step(reuse=True)
    assert len(passes) == 1  # the reshaped view of the same images: one pass
    assert loss == pytest.approx(fresh_loss, rel=1e-6)
    for a, b in zip(grads, fresh_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # other images, images changed in place, eval mode or no grad: a pass of their own
    for case in ("other", "in_place", "eval", "no_grad"):
        passes.clear()
        enc.train(case != "eval")
        imgs = images.clone()
        with torch.set_grad_enabled(case != "no_grad"):
            enc(imgs)
            if case == "in_place":
                imgs[:, :8] = 0
            target = blob_scenes(8, seed=4) if case == "other" else imgs
            expected = CNNEncoder.reconstruction_loss(copy.deepcopy(enc), target)
            assert enc.reconstruction_loss(target).item() == pytest.approx(expected.item())
        assert len(passes) == 3, case  # the forward, the copy's loss and this loss: no reuse
    enc.train()
    enc(images)
    assert enc._last_keypoints is not None
    assert copy.deepcopy(enc)._last_keypoints is None  # one step's graph is never copied


@pytest.mark.parametrize("projector", ["attention", "perceiver"])
def test_query_projectors_are_instruction_conditioned(projector):
    torch.manual_seed(0)
    obs = make_obs(batch=2)
    obs["image"][1] = obs["image"][0]
    obs["state"][1] = obs["state"][0]  # same scene, different instructions (red vs blue)
    for conditioned, differ in ((True, True), (False, False)):
        model = VLA(VLAConfig(projector=projector, projector_config={"conditioned": conditioned}))
        with torch.no_grad():
            prefix = model.trunk.prefix(obs["instruction"], obs["instruction_mask"])
            vis = model.trunk.projector(model.trunk.vision(obs["image"]), prefix.context)
        assert (not torch.allclose(vis[0], vis[1])) is differ, (projector, conditioned)


def test_vision_skip_widens_features():
    base = VLA(VLAConfig(projector_tokens=4))
    skip = VLA(VLAConfig(projector_tokens=4, vision_skip=True))
    d = base.trunk.hidden_size
    assert skip.trunk.feature_dim == base.trunk.feature_dim + 4 * d
    assert skip(make_obs()).shape == (B, skip.trunk.feature_dim)


def test_film_conditions_cnn_features_on_the_instruction():
    torch.manual_seed(0)
    obs = make_obs(batch=2)
    obs["image"][1] = obs["image"][0]  # same image, different instructions (red vs blue)
    cfg = VLAConfig(vision_config={"film": True}, projector="mlp")
    model = VLA(cfg)
    plain = VLA(VLAConfig(projector="mlp"))
    enc = model.trunk.vision
    with torch.no_grad():
        ctx = model.trunk.prefix(obs["instruction"], obs["instruction_mask"]).context
        # zero-initialised FiLM is the identity: both instructions see the same features
        tokens = enc(obs["image"], ctx)
        torch.testing.assert_close(tokens[0], tokens[1])
        enc.film.weight.normal_(std=0.5)
        tokens = enc(obs["image"], ctx)
        assert not torch.allclose(tokens[0], tokens[1])
        # the trunk routes the context into the encoder; the layout of the other parts is unchanged
        assert model(obs).shape == plain(obs).shape
    with pytest.raises(ValueError, match="context"):
        enc(obs["image"])
    with pytest.raises(ValueError, match="vision_config.film"):
        VLA(VLAConfig(vision="siglip", vision_config={"film": True}))


def test_attention_context_pool_starts_as_the_mean_and_ignores_padding():
    torch.manual_seed(0)
    obs = make_obs(batch=2)
    mean_model = VLA(VLAConfig())
    att_model = VLA(VLAConfig(context_pool="attention"))
    att_model.load_state_dict(mean_model.state_dict(), strict=False)  # same LM weights
    ids, mask = obs["instruction"], obs["instruction_mask"]
    with torch.no_grad():
        mean_ctx = mean_model.trunk.prefix(ids, mask).context
        torch.testing.assert_close(att_model.trunk.prefix(ids, mask).context, mean_ctx)
        att_model.trunk.context_query.normal_(std=3.0)  # memoised prefixes are invalidated
        ctx = att_model.trunk.prefix(ids, mask).context
        assert not torch.allclose(ctx, mean_ctx)
        # tokens behind the mask carry no weight: changing them changes nothing
        ids2 = ids.clone()
        ids2[mask == 0] = 7
        torch.testing.assert_close(att_model.trunk.prefix(ids2, mask).context, ctx)
    with pytest.raises(ConfigError, match="context_pool"):
        VLAConfig(context_pool="max")


def test_kv_cache_keyword_follows_the_transformers_release():
    from types import SimpleNamespace

    from torch import nn

    from vla_ray.models.language import cache_keyword, output_cache

    class NewDecoder(nn.Module):  # transformers >= 5.2x: `cache`
        def forward(self, inputs_embeds=None, cache=None, use_cache=None):
            return None

    class OldDecoder(nn.Module):  # earlier releases: `past_key_values`
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):
            return None

    assert cache_keyword(NewDecoder()) == "cache"
    assert cache_keyword(OldDecoder()) == "past_key_values"
    assert output_cache(SimpleNamespace(cache="new")) == "new"
    assert output_cache(SimpleNamespace(past_key_values="old")) == "old"
    # the installed release: the keyword the tiny default LM's decoder really takes
    import inspect

    from vla_ray.models.language import decoder_of

    decoder = decoder_of(VLA(VLAConfig()).trunk.lm)
    assert cache_keyword(decoder) in inspect.signature(decoder.forward).parameters


def test_state_normalisation_lives_in_the_config_and_survives_save(tmp_path):
    """``state_mean``/``state_std`` standardise the state inside the trunk (the same features as
    the plain model fed the standardised state); saved and loaded with the config."""
    mean, std = [1.0, -2.0, 0.5, 3.0], [2.0, 0.5, 1.0, 4.0]
    torch.manual_seed(0)
    plain = VLA(VLAConfig(vision="none", head="mlp"))
    normed = VLA(VLAConfig(vision="none", head="mlp", state_mean=mean, state_std=std))
    normed.load_state_dict(plain.state_dict())  # the statistics are not weights
    obs = make_obs()
    obs.pop("image")
    scaled = {**obs, "state": (obs["state"] - torch.tensor(mean)) / torch.tensor(std)}
    with torch.no_grad():
        torch.testing.assert_close(normed.trunk(obs), plain.trunk(scaled))
        assert not torch.allclose(normed.trunk(obs), plain.trunk(obs))
    loaded = VLA.from_pretrained(normed.save_pretrained(tmp_path / "vla"))
    assert loaded.config.state_mean == mean and loaded.config.state_std == std
    torch.testing.assert_close(loaded.predict(obs), normed.predict(obs), rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"state_mean": [0.0] * 4}, "give both"),
        ({"state_mean": [0.0] * 3, "state_std": [1.0] * 3}, "expected 4 values each"),
        ({"state_mean": [0.0] * 4, "state_std": [1.0, 0.0, 1.0, 1.0]}, "positive finite stds"),
        ({"state_mean": [float("nan")] * 4, "state_std": [1.0] * 4}, "finite means"),
    ],
)
def test_bad_state_normalisation_names_the_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        VLAConfig(vision="none", **fields)


def test_squashed_gaussian_mean_stays_in_bounds_and_survives_save(tmp_path):
    """``head_config.squash``: the Gaussian's mean is tanh-squashed into the action bounds (a
    pushed-out last layer cannot place it past a bound); without it the mean passes the bound;
    the log-std is left as it is and the setting survives save_pretrained."""
    from vla_ray.models.heads import GaussianHead

    feats = torch.randn(16, 8)
    heads = {s: GaussianHead(8, 2, 1, -1.0, 1.0, init_log_std=-1.2, squash=s) for s in (0, 1)}
    for head in heads.values():
        torch.nn.init.constant_(head.net[-1].bias, 3.0)  # a mean pushed past the bound
    plain, squashed = (heads[s].dist_inputs(feats).chunk(2, dim=-1) for s in (0, 1))
    assert plain[0].min() > 1.5  # unsquashed: beyond the env's bound
    assert squashed[0].abs().max() < 1.0 and squashed[0].min() > 0.99
    assert torch.equal(squashed[1], torch.full_like(squashed[1], -1.2))
    assert torch.allclose(heads[1].predict(feats).flatten(1), squashed[0])

    model = VLA(VLAConfig(head="gaussian", head_config={"squash": True})).eval()
    torch.nn.init.constant_(model.head.net[-1].bias, 5.0)
    loaded = VLA.from_pretrained(model.save_pretrained(tmp_path / "vla")).eval()
    assert loaded.head.squash is True
    actions = loaded.predict(make_obs())
    assert actions.abs().max() < 1.0 and actions.min() > 0.99
    torch.testing.assert_close(actions, model.predict(make_obs()), rtol=0, atol=0)
