"""Shared batched inference for EnvRunners: K Ray actors run the policy for every EnvRunner.

Turned on by ``env_runners.inference`` in a run's settings, e.g.
``{"actors": 2, "gpus_per_actor": 1, "max_batch": 64, "wait_ms": 2}`` (see
:class:`InferenceSettings`). Under it:

- the remote EnvRunners keep only their env loops: their RLModule is an
  :class:`InferenceClientModule` (no weights) whose forward passes go to one of the K
  :class:`InferenceActor` s, which batch the concurrent requests of all EnvRunners (up to
  ``max_batch`` rows, waiting at most ``wait_ms`` for more) and run the real module;
- the actors return what the module's forward returns (action distribution inputs, or actions
  for deterministic heads), so RLlib's module-to-env connectors sample the action and compute
  its log-probability on the EnvRunner exactly as without the service: algorithms train
  unchanged;
- the driver's (local) EnvRunner keeps the full module (checkpoints, ``vla/`` export, evaluation
  with ``evaluation_num_env_runners=0``), owns the actors, and publishes every weight update it
  receives from the learner to them (and to a small store that a restarted actor reads), so the
  weights reach K actors instead of N EnvRunners. APPO's EnvRunners pull the weights as an
  object reference and forward that reference, which the actors resolve;
- an actor that dies is restarted by Ray (``max_restarts``), re-reads the latest weights from the
  store, and the requests in flight are retried on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import tree
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from vla_ray.config import ConfigError

logger = logging.getLogger(__name__)

FIELD = "env_runners.inference"
# seconds the driver waits for the actors to take new weights before sampling goes on
PUSH_TIMEOUT_S = 120.0
# a stopped run's actors and store end once they have had no call for this long (see
# InferenceService.close)
CLOSE_IDLE_S = 5.0


@dataclass(frozen=True)
class InferenceSettings:
    """The ``env_runners.inference`` option."""

    # inference actors; EnvRunner i sends its batches to actor (i - 1) % actors
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    # rows (env observations) per forward pass at most
    max_batch: int = 64
    # how long an actor waits for more requests once one has arrived (0: batch only what
    # queued up during the previous forward pass)
    wait_ms: float = 2.0
    # Ray restarts a dead actor this many times (-1: always)
    max_restarts: int = -1
    # prefix of the actors' Ray names; unique per run (set by ``from_dict``)
    name: str = ""

    @classmethod
    def from_dict(cls, data: Any, field: str = FIELD) -> InferenceSettings:
        """Validated settings; ConfigError naming the field, what is expected and what was given."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{field}: expected a dict such as {{'actors': 2, 'max_batch': 64}}, got {data!r}"
            )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {unknown}; valid keys are {names}")
        out = {**{n: getattr(cls, n) for n in names}, **data}
        for key, minimum in (("actors", 1), ("max_batch", 1), ("max_restarts", -1)):
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{field}.{key}: expected an integer >= {minimum}, got {value!r}")
        for key in ("gpus_per_actor", "cpus_per_actor", "wait_ms"):
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{field}.{key}: expected a number >= 0, got {value!r}")
            out[key] = float(value)
        return cls(**out, name=f"vla-inference-{uuid.uuid4().hex[:10]}")

    def actor_name(self, index: int) -> str:
        return f"{self.name}-actor-{index}"

    @property
    def store_name(self) -> str:
        return f"{self.name}-store"


def use_inference_service(config, settings: dict[str, Any]) -> InferenceSettings:
    """Turn the service on in an RLlib ``AlgorithmConfig`` (its EnvRunner class); returns the
    validated settings. The service needs remote EnvRunners (``num_env_runners >= 1``)."""
    parsed = InferenceSettings.from_dict(settings)
    if int(config.num_env_runners or 0) < 1:
        raise ConfigError(
            f"{FIELD}: the inference service serves remote EnvRunners; expected "
            f"env_runners.num_env_runners >= 1, got {config.num_env_runners} "
            "(--local runs sample in the driver)"
        )
    if config.env_runner_cls not in (None, SingleAgentEnvRunner):
        raise ConfigError(
            f"{FIELD}: the service runs on RLlib's SingleAgentEnvRunner; this algorithm uses "
            f"{config.env_runner_cls.__name__}"
        )
    # the settings travel to every EnvRunner process as a class attribute
    runner_cls = type("InferenceEnvRunner", (InferenceEnvRunner,), {"SETTINGS": parsed})
    config.env_runners(env_runner_cls=runner_cls)
    return parsed


# ---- the actors ------------------------------------------------------------------------------
class _EndsWhenIdle:
    """An actor that can be told to end once it has had no call for a while."""

    _last_call = 0.0

    def _touch(self) -> None:
        self._last_call = time.monotonic()

    async def close_when_idle(self, idle_s: float) -> None:
        """End this actor (no restart) once no call has come for ``idle_s`` seconds."""
        self._touch()
        while time.monotonic() - self._last_call < idle_s or self._busy():
            await asyncio.sleep(idle_s / 5)
        ray.actor.exit_actor()

    def _busy(self) -> bool:
        return False


class WeightStore(_EndsWhenIdle):
    """The latest published weights (an object reference), for actors that (re)start."""

    def __init__(self) -> None:
        self._seq_no, self._refs = -1, []

    def publish(self, seq_no: int, refs: list) -> bool:
        """Keep ``refs[0]`` when it is newer (a ``seq_no`` of 0 always is); True if kept."""
        self._touch()
        if 0 < seq_no <= self._seq_no:
            return False
        self._seq_no, self._refs = seq_no, refs
        return True

    def latest(self) -> tuple[int, list]:
        self._touch()
        return self._seq_no, self._refs


def _single_module_state(state: dict[str, Any]) -> dict[str, Any]:
    """The default module's state out of a (multi-module) EnvRunner or learner state."""
    return state.get(DEFAULT_MODULE_ID, state)


def _num_rows(batch: dict[str, Any]) -> int:
    return len(tree.flatten(batch[Columns.OBS])[0])


class InferenceActor(_EndsWhenIdle):
    """Runs the policy for many EnvRunners, batching their concurrent requests."""

    def __init__(self, module_spec: RLModuleSpec, settings: InferenceSettings, store) -> None:
        gpu = settings.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        if settings.cpus_per_actor >= 2:
            torch.set_num_threads(int(settings.cpus_per_actor))
        self.module: RLModule = module_spec.build()
        self.module.to(self.device)
        self.module.eval()
        self.max_batch, self.wait_s = settings.max_batch, settings.wait_ms / 1000.0
        self.seq_no = -1
        # one thread runs forward passes and weight loads in order
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._pending: list[tuple[str, dict, int, Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._batch_sizes: Counter[int] = Counter()
        self.started = time.time()
        # a restarted actor starts from the latest published weights
        seq_no, refs = ray.get(store.latest.remote())
        if refs:
            self.module.set_state(_single_module_state(ray.get(refs[0])))
            self.seq_no = seq_no

    async def infer(self, mode: str, batch: dict[str, Any], t: int | None = None) -> dict:
        """The module's forward output for ``batch`` (numpy); ``mode``: ``"exploration"`` or
        ``"inference"``."""
        self._touch()
        if self._batcher is None:
            self._arrived, self._full = asyncio.Event(), asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._run_batches())
        future = asyncio.get_running_loop().create_future()
        self._pending.append((mode, batch, _num_rows(batch), t, future))
        self._arrived.set()
        if sum(p[2] for p in self._pending) >= self.max_batch:
            self._full.set()
        return await future

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            if sum(p[2] for p in self._pending) < self.max_batch and self.wait_s > 0:
                self._full.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
            # the oldest request's mode; requests of that mode up to max_batch rows
            mode, t = self._pending[0][0], self._pending[0][3]
            take, rest, rows = [], [], 0
            for p in self._pending:
                if p[0] == mode and (not take or rows + p[2] <= self.max_batch):
                    take.append(p)
                    rows += p[2]
                else:
                    rest.append(p)
            self._pending = rest
            batch = tree.map_structure(lambda *xs: np.concatenate(xs), *[p[1] for p in take])
            try:
                out = await loop.run_in_executor(self._executor, self._forward, mode, batch, t)
            except Exception as err:  # every waiting EnvRunner gets the error
                for p in take:
                    p[4].set_exception(err)
                continue
            self._batch_sizes[rows] += 1
            start = 0
            for p in take:
                stop = start + p[2]
                p[4].set_result(tree.map_structure(lambda x, a=start, b=stop: x[a:b], out))
                start = stop

    def _busy(self) -> bool:
        return bool(self._pending)

    def _forward(self, mode: str, batch: dict[str, Any], t: int | None) -> dict[str, Any]:
        tensors = tree.map_structure(lambda x: torch.as_tensor(x, device=self.device), batch)
        with torch.no_grad():
            if mode == "exploration":
                out = self.module.forward_exploration(tensors, t=t)
            else:
                out = self.module.forward_inference(tensors)
        return {k: v.detach().cpu().numpy() for k, v in out.items() if torch.is_tensor(v)}

    async def set_weights(self, seq_no: int, refs: list) -> bool:
        """Load ``refs[0]`` (a module state) unless it is older than the weights held (a
        ``seq_no`` of 0 always loads); True if loaded."""
        self._touch()
        if 0 < seq_no <= self.seq_no:
            return False
        state = _single_module_state(await refs[0])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.module.set_state, state)
        self.seq_no = max(self.seq_no, seq_no)
        return True

    def dist_classes(self) -> dict[str, Any]:
        """The module's action distribution classes by use (None where it defines none)."""
        out = {}
        for use in ("inference", "exploration", "train"):
            try:
                out[use] = getattr(self.module, f"get_{use}_action_dist_cls")()
            except Exception:
                out[use] = None
        return out

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Batches run and their sizes (rows), process id, weights held, uptime."""
        sizes = dict(self._batch_sizes)
        if reset:
            self._batch_sizes.clear()
        rows = sum(k * v for k, v in sizes.items())
        batches = sum(sizes.values())
        return dict(
            pid=os.getpid(),
            weights_seq_no=self.seq_no,
            batches=batches,
            rows=rows,
            mean_batch=rows / batches if batches else None,
            max_batch=max(sizes) if sizes else None,
            batch_sizes={str(k): v for k, v in sorted(sizes.items())},
            uptime_s=time.time() - self.started,
        )


class InferenceService:
    """Handles to a run's inference actors and weight store."""

    def __init__(self, settings: InferenceSettings, actors: list, store) -> None:
        self.settings, self.actors, self.store = settings, actors, store

    @classmethod
    def create(cls, settings: InferenceSettings, module_spec: RLModuleSpec) -> InferenceService:
        """Start the store and the actors (named after ``settings.name``); owned by the caller."""
        store = (
            ray.remote(WeightStore)
            .options(name=settings.store_name, num_cpus=0, max_restarts=-1)
            .remote()
        )
        actor_cls = ray.remote(InferenceActor)
        actors = [
            actor_cls.options(
                name=settings.actor_name(i),
                num_cpus=settings.cpus_per_actor,
                num_gpus=settings.gpus_per_actor,
                max_restarts=settings.max_restarts,
                max_task_retries=-1,
                max_concurrency=1000,
            ).remote(module_spec, settings, store)
            for i in range(settings.actors)
        ]
        return cls(settings, actors, store)

    @classmethod
    def connect(cls, settings: InferenceSettings, timeout_s: float = 300.0) -> InferenceService:
        """Look the run's actors up by name (waiting while the driver starts them)."""
        deadline = time.time() + timeout_s
        while True:
            try:
                store = ray.get_actor(settings.store_name)
                actors = [ray.get_actor(settings.actor_name(i)) for i in range(settings.actors)]
                return cls(settings, actors, store)
            except ValueError:
                if time.time() > deadline:
                    raise TimeoutError(
                        f"{FIELD}: the inference actors {settings.name}-* did not appear "
                        f"within {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)

    def publish(self, seq_no: int, state: Any, wait: bool = True) -> None:
        """Give the actors new weights (a module state, or an object reference to one).

        With ``wait``, return once every live actor holds them (so the next samples use them);
        an actor that is down reads them from the store when it restarts."""
        ref = state if isinstance(state, ray.ObjectRef) else ray.put(state)
        if not ray.get(self.store.publish.remote(seq_no, [ref])):
            return
        calls = [a.set_weights.remote(seq_no, [ref]) for a in self.actors]
        if not wait:
            return
        done, _ = ray.wait(calls, num_returns=len(calls), timeout=PUSH_TIMEOUT_S)
        for call in done:
            try:
                ray.get(call)
            except ray.exceptions.RayError as err:  # restarts and reads the store
                logger.warning("%s: an inference actor missed a weight update: %s", FIELD, err)

    def stats(self, reset: bool = False) -> list[dict[str, Any]]:
        """Each actor's :meth:`InferenceActor.stats`."""
        return ray.get([a.stats.remote(reset) for a in self.actors])

    def stop(self) -> None:
        """Kill the actors and the store now."""
        for actor in [*self.actors, self.store]:
            ray.kill(actor, no_restart=True)

    def close(self, idle_s: float = CLOSE_IDLE_S) -> None:
        """End the actors and the store once each has had no call for ``idle_s`` seconds: the
        run's end. RLlib stops the local EnvRunner (the owner) before the remote ones, which
        may still be finishing a sample through the actors; killed under them, that sample
        fails and each EnvRunner sleeps ``delay_between_env_runner_restarts_s`` (60 s) before
        it exits, and the algorithm's stop waits for it."""
        for actor in [*self.actors, self.store]:
            actor.close_when_idle.remote(idle_s)


# ---- the EnvRunner side ----------------------------------------------------------------------
def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else x


class InferenceClientModule(TorchRLModule):
    """An EnvRunner's policy without weights: its forward passes run on an inference actor.

    ``model_config``: ``settings`` (an :class:`InferenceSettings`) and ``actor`` (which actor).
    """

    @override(RLModule)
    def setup(self) -> None:
        self._settings: InferenceSettings = self.model_config["settings"]
        self._actor_index = int(self.model_config.get("actor", 0)) % self._settings.actors
        self._actor = None
        self._dist_classes: dict[str, Any] | None = None

    def _handle(self):
        if self._actor is None:
            service = InferenceService.connect(self._settings)
            self._actor = service.actors[self._actor_index]
        return self._actor

    def _remote(self, mode: str, batch: dict[str, Any], t: int | None = None) -> dict[str, Any]:
        request = tree.map_structure(_to_numpy, dict(batch))
        out = ray.get(self._handle().infer.remote(mode, request, t))
        return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}

    @override(RLModule)
    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._remote("inference", batch)

    @override(RLModule)
    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._remote("exploration", batch, kwargs.get("t"))

    @override(RLModule)
    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        raise NotImplementedError("InferenceClientModule runs on EnvRunners only; it cannot train")

    def _dist_cls(self, use: str):
        if self._dist_classes is None:
            self._dist_classes = ray.get(self._handle().dist_classes.remote())
        cls = self._dist_classes[use]
        if cls is None:
            raise ConfigError(f"head: the module defines no {use} action distribution")
        return cls

    @override(TorchRLModule)
    def get_inference_action_dist_cls(self):
        return self._dist_cls("inference")

    @override(TorchRLModule)
    def get_exploration_action_dist_cls(self):
        return self._dist_cls("exploration")

    @override(TorchRLModule)
    def get_train_action_dist_cls(self):
        return self._dist_cls("train")

    @override(TorchRLModule)
    def get_state(self, *args, **kwargs) -> dict[str, Any]:
        return {}  # the weights live on the inference actors

    @override(TorchRLModule)
    def set_state(self, state: dict[str, Any]) -> None:
        pass


class InferenceEnvRunner(SingleAgentEnvRunner):
    """A SingleAgentEnvRunner under the inference service (see the module docstring).

    Remote instances run an :class:`InferenceClientModule`; the training group's local instance
    keeps the full module, starts the service and publishes the weights it receives.
    ``use_inference_service`` makes a subclass carrying the run's ``SETTINGS``.
    """

    SETTINGS: InferenceSettings = InferenceSettings()

    def __init__(self, *, config, **kwargs) -> None:
        self._service: InferenceService | None = None
        super().__init__(config=config, **kwargs)
        if self._owns_service:
            spec = self.config.get_rl_module_spec(
                env=self.env.unwrapped if self.env is not None else None,
                spaces=self.get_spaces(),
                inference_only=True,
            )
            self._service = InferenceService.create(self.SETTINGS, spec)

    @property
    def _is_client(self) -> bool:
        return bool(self.worker_index)

    @property
    def _owns_service(self) -> bool:
        return not self.worker_index and not self.config.in_evaluation

    @property
    def service(self) -> InferenceService | None:
        """The service handles (on the owning, local EnvRunner: from the start)."""
        return self._service

    @override(SingleAgentEnvRunner)
    def make_module(self) -> None:
        if not self._is_client:
            super().make_module()
            return
        spec = self.config.get_rl_module_spec(
            env=self.env.unwrapped if self.env is not None else None,
            spaces=self.get_spaces(),
            inference_only=True,
        )
        self.module = InferenceClientModule(
            observation_space=spec.observation_space,
            action_space=spec.action_space,
            inference_only=True,
            model_config={"settings": self.SETTINGS, "actor": self.worker_index - 1},
        )

    @override(SingleAgentEnvRunner)
    def set_state(self, state: dict[str, Any]) -> None:
        seq_no = int(state.get(WEIGHTS_SEQ_NO, 0) or 0)
        new_weights = COMPONENT_RL_MODULE in state and (
            seq_no == 0 or self._weights_seq_no < seq_no
        )
        if not self._is_client:
            super().set_state(state)
            if new_weights and self._service is not None:
                self._service.publish(seq_no, self.module.get_state())
            return
        state = dict(state)
        module_state = state.pop(COMPONENT_RL_MODULE, None)
        # weights pulled as a reference (APPO's state server): pass the reference on
        if new_weights and isinstance(module_state, ray.ObjectRef):
            if self._service is None:
                self._service = InferenceService.connect(self.SETTINGS)
            self._service.publish(seq_no, module_state, wait=False)
        super().set_state(state)
        if new_weights and seq_no > 0:
            self._weights_seq_no = seq_no

    @override(SingleAgentEnvRunner)
    def stop(self) -> None:
        super().stop()
        if self._service is not None and self._owns_service:
            self._service.close()  # the remote EnvRunners stop after this one
        else:
            self._service = None
