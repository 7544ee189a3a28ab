"""In-process cloning of the scripted expert (the quickstart's first stage): expert frames with
noise-free labels, a time-budgeted Adam loop, a save_pretrained result `vla-ray eval` loads."""

import json

import numpy as np
import pytest

from vla_ray.clone import clone, clone_run, expert_frames
from vla_ray.presets import get_preset

ENV = "vla_ray/LangReach-v0"


def test_expert_frames_label_every_step_with_the_noise_free_expert():
    clean = expert_frames(ENV, 2, seed=5, progress=False)
    noisy = expert_frames(ENV, 2, seed=5, noise=0.5, progress=False)
    for frames in (clean, noisy):
        n = len(frames["action"])
        assert {k: len(v) for k, v in frames.items()} == dict.fromkeys(frames, n)
        assert frames["image"].shape[1:] == (64, 64, 3) and frames["action"].shape == (n, 2)
    # same resets: the first frame and its label agree; the noise moves the later states
    assert np.array_equal(clean["image"][0], noisy["image"][0])
    np.testing.assert_array_equal(clean["action"][0], noisy["action"][0])
    assert np.abs(noisy["action"]).max() <= 1.0  # labels are the expert's clipped actions


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"episodes": 0}, "episodes"), ({"episodes": 1, "noise": -1}, "noise")]
)
def test_expert_frames_refuse_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        expert_frames(ENV, progress=False, **kwargs)


def test_clone_run_writes_a_policy_that_eval_loads(tmp_path):
    from vla_ray.evaluate import load_policy

    model = dict(get_preset("langreach-ppo").model)
    path = clone_run(tmp_path / "bc", model, ENV, episodes=2, seconds=0.01, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "bc" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] >= 1 and rows[-1]["learner"]["aux_loss"] > 0  # recon trained
    # no preset: `vla-ray report` offers no (wrong) `vla-ray train --preset` command for it
    config = json.loads((tmp_path / "bc" / "config.json").read_text())
    assert "preset" not in config and config["episodes"] == 2
    policy = load_policy(path)
    assert policy.meta["env"] == ENV and policy.meta["iteration"] == rows[-1]["iteration"]
    obs = expert_frames(ENV, 1, progress=False)
    batch = {k: v[:1] for k, v in obs.items() if k != "action"}
    assert np.asarray(policy(batch)).shape == (1, 2)


def test_clone_lowers_the_loss_on_its_frames():
    frames = expert_frames(ENV, 3, seed=1, progress=False)
    model = dict(get_preset("langreach-ppo").model, vision_config={"tokens": "keypoints"})
    _, rows = clone(model, frames, ENV, updates=8, log_every=1, seed=0)  # not wall clock: flaky
    losses = [r["learner"]["bc_loss"] for r in rows]
    assert len(losses) >= 3 and min(losses[-2:]) < losses[0]


def test_clone_refuses_frames_without_labels():
    frames = expert_frames(ENV, 1, progress=False)
    frames.pop("action")
    with pytest.raises(ValueError, match="frames: expected an 'action' column"):
        clone(dict(get_preset("langreach-ppo").model), frames, ENV, seconds=1.0)


def test_expert_frames_with_a_policy_visit_its_states_and_keep_the_expert_labels():
    expert = expert_frames(ENV, 1, seed=3, progress=False)
    still = np.zeros(2, np.float32)
    dagger = expert_frames(ENV, 1, seed=3, progress=False, policy=lambda obs: still)
    # the same reset and label at the first frame; then the policy's states, expert-labelled
    assert np.array_equal(expert["image"][0], dagger["image"][0])
    np.testing.assert_array_equal(expert["action"][0], dagger["action"][0])
    assert not np.array_equal(expert["image"][1], dagger["image"][1])
    assert np.abs(dagger["action"]).max() > 0.1  # the expert's labels, not the policy's zeros
    # beta=1: the expert acts at every step, as without a policy
    always = expert_frames(ENV, 1, seed=3, progress=False, policy=lambda obs: still, beta=1.0)
    np.testing.assert_array_equal(always["action"], expert["action"])


def test_expert_frames_refuse_a_beta_outside_0_1():
    with pytest.raises(ValueError, match=r"beta: must be in \[0, 1\], got 1.5"):
        expert_frames(ENV, 1, progress=False, beta=1.5)


def test_clone_for_a_number_of_updates_and_on_from_a_given_vla():
    import torch

    frames = expert_frames(ENV, 1, seed=1, progress=False)
    model = dict(get_preset("langreach-ppo").model, vision_config={"tokens": "keypoints"})
    vla, rows = clone(model, frames, ENV, updates=3, batch_size=8, log_every=1)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    before = [p.detach().clone() for p in vla.parameters()]
    again, rows = clone(model, frames, ENV, updates=2, init=vla, batch_size=8, log_every=1)
    assert again is vla and [r["iteration"] for r in rows] == [1, 2]
    assert any(not torch.equal(a, b) for a, b in zip(before, vla.parameters(), strict=True))
    with pytest.raises(ValueError, match="give exactly one of seconds, updates"):
        clone(model, frames, ENV, seconds=1.0, updates=2)
