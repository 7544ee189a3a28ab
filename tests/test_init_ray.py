"""How vla-ray starts Ray: the environment its workers get."""

from __future__ import annotations

import os

import pytest

from vla_ray.train import PARQUET_FOOTER_ACTORS, PARQUET_FOOTER_ACTORS_VAR, init_ray


@pytest.fixture
def recorded_init(monkeypatch):
    """``ray.init``'s keyword arguments from ``init_ray``, with Ray left as it is."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv(PARQUET_FOOTER_ACTORS_VAR, raising=False)  # restored afterwards
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_parquet_footers_are_read_by_one_actor_unless_the_user_says_otherwise(
    recorded_init, monkeypatch
):
    init_ray(num_cpus=2)
    env = recorded_init[-1]["runtime_env"]["env_vars"]
    assert env[PARQUET_FOOTER_ACTORS_VAR] == str(PARQUET_FOOTER_ACTORS) == "1"
    assert os.environ[PARQUET_FOOTER_ACTORS_VAR] == "1"  # the driver reads it too
    assert recorded_init[-1]["num_cpus"] == 2 and env["OMP_NUM_THREADS"] == "1"

    monkeypatch.setenv(PARQUET_FOOTER_ACTORS_VAR, "8")
    init_ray()
    assert recorded_init[-1]["runtime_env"]["env_vars"][PARQUET_FOOTER_ACTORS_VAR] == "8"
    assert "num_cpus" not in recorded_init[-1]


def test_ray_workers_get_the_footer_setting(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    def worker_value() -> str | None:
        return os.environ.get(PARQUET_FOOTER_ACTORS_VAR)

    assert ray.get(worker_value.remote()) == os.environ[PARQUET_FOOTER_ACTORS_VAR]
