"""VLM pretraining on Ray Train (``TorchTrainer``): stage ``align`` and stage ``instruct``.

The driver reads and checks the LLaVA json records (bad ones are listed by id and skipped), hands
them to the workers as a ``ray.data`` dataset (split equally between workers), and exports the
final checkpoint as a ``VLA.save_pretrained`` directory (``OUTPUT/vlm``) whose trunk
``VLAModule`` loads with ``model_config["vlm_path"]``.

Each worker builds the same model from the seed, wraps it for data parallelism (DDP through
``ray.train.torch.prepare_model``, or FSDP2's ``fully_shard`` per decoder layer, which shards
parameters, gradients and optimiser state over the workers on GPUs and, over gloo, on CPUs),
decodes and tokenises its batches in ``iter_torch_batches``'s collate function
and normalises the loss by the global number of labelled tokens, so N workers compute the same
update as one worker with the same global batch. Run directory::

    OUTPUT/train/checkpoint_*/   Ray Train checkpoints (model.pt, optimizer.pt, state.json)
    OUTPUT/metrics.jsonl          one line per optimiser step (rank 0), as it trains; the driver
                                  follows it for the progress bar and the trackers;
                                  `vla-ray report OUTPUT` draws its curves
    OUTPUT/bad_records.jsonl      the skipped records and why
    OUTPUT/vlm/                   the exported VLM (vla_config.json, model.safetensors, tokenizer)
    OUTPUT/summary.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_ray.config import VISION_ENCODERS, ConfigError, VLAConfig, check_choice
from vla_ray.pretrain.data import IGNORE_INDEX
from vla_ray.pretrain.model import STAGES

RUN_NAME = "train"
VLM_DIR = "vlm"
META_NAME = "vlm_meta.json"
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")
# The trunk of the langreach-ppo preset, so a pretrained VLM drops into the RL preset as is.
DEFAULT_VISION_CONFIG = {"cnn": {"tokens": "keypoints"}}


class PretrainError(RuntimeError):
    """Pretraining stopped; the message says why (a bad record names its id)."""


@dataclass
class PretrainConfig:
    """Settings of one ``vla-ray pretrain`` run (the CLI flags)."""

    stage: str
    data: str
    output: str
    image_folder: str | None = None
    init: str | None = None  # a VLM directory from an earlier stage (e.g. align -> instruct)
    vision: str = "cnn"
    llm: str | None = None
    tokenizer: str | None = None
    projector: str = "attention"
    projector_tokens: int = 8
    image_size: int = 64
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    lora: bool = False
    lora_r: int = 8
    train_vision: bool = False  # instruct: also train the vision encoder (from-scratch encoders)
    strategy: str = "ddp"
    precision: str = "fp32"  # bf16: autocast on the worker's device (CUDA, or CPU)
    gradient_checkpointing: bool | None = None  # None: on with use_gpu
    batch_size: int = 32  # global, over all workers and accumulation steps
    grad_accum: int = 1
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None  # default 1e-3 (align), 3e-4 (instruct)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # metric-only ray.train.report calls every N steps (None: reports ride on checkpoints;
    # every step goes to metrics.jsonl anyway): each took 0.6-1.6 s in Ray Train 2.60 here
    log_every: int | None = None
    max_bad_fraction: float = 0.05
    resume: bool = False
    progress: bool = True
    fail_at_step: int | None = None  # fault injection for tests: raise before this step
    extra_model_config: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        check_choice("stage", self.stage, STAGES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("precision", self.precision, PRECISIONS)
        for name in ("num_workers", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("epochs", "max_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ConfigError(
                f"batch_size: the global batch {self.batch_size} must be divisible by "
                f"num_workers x grad_accum = {self.num_workers} x {self.grad_accum}"
            )
        if self.train_vision and self.stage == "align":
            raise ConfigError("train_vision: stage align trains only the projector")
        if self.lora and self.stage == "align":
            raise ConfigError("lora: stage align trains only the projector; LoRA is for instruct")

    @property
    def checkpoint_activations(self) -> bool:
        """Whether the language model recomputes activations in the backward pass."""
        if self.gradient_checkpointing is None:
            return self.use_gpu
        return self.gradient_checkpointing

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.stage == "align" else 3e-4)


# ----------------------------------------------------------------------------- model config
def _vision_family(path: str) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ConfigError(
            f"vision: {path!r} is neither one of {', '.join(VISION_ENCODERS)} nor a transformers "
            "model directory with a config.json"
        )
    model_type = json.loads(cfg.read_text()).get("model_type", "")
    for family in ("siglip", "clip", "dinov2"):
        if model_type.startswith(family):
            return family
    raise ConfigError(
        f"vision: {path}: model_type {model_type!r} is not a SigLIP, CLIP or DINOv2 vision model"
    )


def vla_config_for(cfg: PretrainConfig) -> VLAConfig:
    """The VLAConfig of the model to pretrain (from ``cfg.init`` when given)."""
    if cfg.init:
        from vla_ray.models.vla import CONFIG_NAME

        path = Path(cfg.init) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"--init {cfg.init}: not a VLM directory (no {CONFIG_NAME})")
        data = VLAConfig.load(path).to_dict()
    else:
        data: dict[str, Any] = dict(
            image_size=(cfg.image_size, cfg.image_size),
            state_dim=0,
            projector=cfg.projector,
            projector_tokens=cfg.projector_tokens,
            head="mlp",
        )
        if cfg.vision in VISION_ENCODERS:
            data["vision"] = cfg.vision
            data["vision_config"] = dict(DEFAULT_VISION_CONFIG.get(cfg.vision, {}))
        else:
            data["vision"] = _vision_family(cfg.vision)
            data["vision_path"] = cfg.vision
        if cfg.llm:
            data["llm_path"] = cfg.llm
            tok = cfg.tokenizer or (
                cfg.llm if (Path(cfg.llm) / "tokenizer_config.json").is_file() else None
            )
            data["tokenizer_path"] = tok
        elif cfg.tokenizer:
            data["tokenizer_path"] = cfg.tokenizer
    data.update(cfg.extra_model_config)
    data["lora"] = {"r": cfg.lora_r} if cfg.lora else None
    for k in ("freeze_vision", "freeze_projector", "freeze_llm"):
        data[k] = False  # the stage decides what trains
    return VLAConfig.from_dict(data)


def shard_fsdp(vlm: Any) -> None:
    """FSDP2: one ``fully_shard`` unit per decoder layer of the LM (its ``_no_split_modules``),
    everything else (vision encoder, projector, embeddings, LM head) in the root unit."""
    from torch.distributed.fsdp import fully_shard

    lm = vlm.trunk.lm
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    layer_classes = set(getattr(inner, "_no_split_modules", None) or ())
    for module in list(lm.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(vlm)


def build_vlm(vla_config: dict[str, Any], cfg: PretrainConfig) -> tuple[Any, Any]:
    """The model one worker trains, on the CPU and unwrapped: ``(vla, vlm)``, the VLA built from
    the seed (and ``cfg.init``) with the stage's parameters trainable and activation
    checkpointing as configured, and the ``VisionLanguageModel`` over its trunk."""
    from vla_ray.models.language import enable_activation_checkpointing
    from vla_ray.pretrain.model import VisionLanguageModel, set_trainable

    vla = build_vla(vla_config, cfg.init, cfg.seed)
    set_trainable(vla.trunk, cfg.stage, cfg.train_vision)
    if cfg.checkpoint_activations:
        enable_activation_checkpointing(vla.trunk.lm)
    return vla, VisionLanguageModel(vla.trunk)


def optimizer_step(
    model: Any,
    micro_batches: list[dict[str, Any]],
    opt: Any,
    cfg: PretrainConfig,
    *,
    device: Any,
    global_count: float,
    world: int = 1,
) -> float:
    """One optimiser step over ``micro_batches`` (gradient accumulation); returns their summed
    token loss.

    ``global_count`` is the number of labelled tokens in this step over all ``world`` workers:
    the loss is a sum over tokens divided by it, so any split of the global batch over workers
    and micro-batches makes the same update. ``model`` is DDP-wrapped when ``cfg.strategy`` is
    ddp and ``world > 1``, sharded by ``shard_fsdp`` when it is fsdp and ``world > 1``.
    """
    import torch

    is_ddp = cfg.strategy == "ddp" and world > 1
    fsdp = cfg.strategy == "fsdp" and world > 1
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    loss_total = 0.0
    for j, b in enumerate(micro_batches):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        last = j == len(micro_batches) - 1
        sync = model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        if fsdp:  # reduce-scatter the gradients on the last micro-batch only
            model.set_requires_gradient_sync(last)
        with sync, autocast:
            loss_sum, _ = model(**b)
            # DDP and FSDP average gradients over workers: scale so the sum is over all tokens
            (loss_sum * (world / global_count)).backward()
        loss_total += float(loss_sum.detach())
    params = [p for group in opt.param_groups for p in group["params"]]
    if cfg.max_grad_norm:  # FSDP2's sharded (DTensor) gradients included
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_total


def build_vla(config: dict[str, Any], init: str | None, seed: int):
    """The same model on every worker: seeded construction, then the ``init`` weights if any."""
    import torch

    from vla_ray.models.vla import VLA, load_trunk_weights

    torch.manual_seed(seed)
    vla = VLA(VLAConfig.from_dict(config))
    if init:
        load_trunk_weights(vla, init)
    return vla


# ------------------------------------------------------------------------------ worker loop
def _train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: build, restore, train, report metrics and checkpoints."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from vla_ray.pretrain.ray_data import CollateBatch

    cfg = PretrainConfig(**loop_config["pretrain"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = get_device() if cfg.use_gpu else torch.device("cpu")

    vla, vlm = build_vlm(loop_config["vla_config"], cfg)
    tokenizer = vla.tokenizer
    num_image_tokens = vlm.num_image_tokens
    image_size = tuple(vla.config.image_size)

    fsdp = cfg.strategy == "fsdp" and world > 1
    is_ddp = cfg.strategy == "ddp" and world > 1
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    opt_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            vlm.load_state_dict(
                torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True)
            )
            state = json.loads((Path(d) / "state.json").read_text())
            if (Path(d) / "optimizer.pt").is_file():
                opt_state = torch.load(
                    Path(d) / "optimizer.pt", map_location="cpu", weights_only=True
                )

    # Ray Train's prepare_model wraps FSDP1 on GPUs only; FSDP2 shards on CPUs (gloo) as well
    model = prepare_model(vlm, move_to_device=device, parallel_strategy="ddp" if is_ddp else None)
    if fsdp:
        shard_fsdp(vlm)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if opt_state is not None:  # full (unsharded), keyed by parameter name: any strategy/world
        set_optimizer_state_dict(
            vlm, opt, opt_state, options=StateDictOptions(full_state_dict=True)
        )

    def full_state() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(model, optimiser) state dicts, unsharded, on rank 0; (None, None) elsewhere.

        Collective under FSDP: every rank takes part, rank 0 receives the full tensors.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(vlm, options=options)
        osd = get_optimizer_state_dict(vlm, opt, options=options)
        return (sd, osd) if rank == 0 else (None, None)

    saved = {"step": state["step"]}

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        saved["step"] = state["step"]
        sd, osd = full_state()
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(sd, Path(d) / "model.pt")
            torch.save(osd, Path(d) / "optimizer.pt")
            (Path(d) / "state.json").write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    def all_sum(x: float) -> float:
        if world == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())

    micro = cfg.batch_size // (world * cfg.grad_accum)
    shard = ray.train.get_dataset_shard("train")
    epochs = cfg.epochs if cfg.epochs is not None else (10**9 if cfg.max_steps else 1)
    max_steps = cfg.max_steps if cfg.max_steps is not None else 10**12
    metrics_path = Path(loop_config["metrics_path"])
    if rank == 0 and ckpt is not None and metrics_path.is_file():
        # steps logged after the restored checkpoint are replayed: drop their old lines
        kept = [
            line
            for line in metrics_path.read_text().splitlines()
            if line and json.loads(line)["step"] <= state["step"]
        ]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    collate_fn = CollateBatch(tokenizer, num_image_tokens, image_size, cfg.max_length)

    model.train()
    last_metrics: dict[str, Any] = {}
    done = state["step"] >= max_steps
    epoch = state["epoch"]
    t_last = time.perf_counter()
    while not done and epoch < epochs:
        skip = state["step_in_epoch"] * cfg.grad_accum if epoch == state["epoch"] else 0
        batches = shard.iter_torch_batches(
            batch_size=micro, collate_fn=collate_fn, drop_last=True, prefetch_batches=1
        )
        pending: list[dict[str, torch.Tensor]] = []
        step_in_epoch = state["step_in_epoch"] if epoch == state["epoch"] else 0
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            pending.append(batch)
            if len(pending) < cfg.grad_accum:
                continue
            if cfg.fail_at_step is not None and state["step"] + 1 == cfg.fail_at_step:
                raise RuntimeError(f"fault injection: failing before step {cfg.fail_at_step}")
            local_count = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in pending)
            global_count = max(all_sum(local_count), 1.0)
            loss_total = optimizer_step(
                model, pending, opt, cfg, device=device, global_count=global_count, world=world
            )
            pending = []
            loss = all_sum(loss_total) / global_count
            step_in_epoch += 1
            state.update(step=state["step"] + 1, epoch=epoch, step_in_epoch=step_in_epoch)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            last_metrics = dict(
                step=state["step"],
                epoch=epoch,
                loss=loss,
                tokens=int(global_count),
                samples_per_s=cfg.batch_size / dt if dt > 0 else None,
                step_time_s=dt,
            )
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last_metrics) + "\n")
            done = state["step"] >= max_steps
            if done or state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(last_metrics)
            elif cfg.log_every and state["step"] % cfg.log_every == 0:
                ray.train.report(last_metrics)
            if done:
                break
        if not done:
            epoch += 1
            state.update(epoch=epoch, step_in_epoch=0)
    if state["step"] == 0:
        raise PretrainError(
            f"no optimiser step ran: each worker gets fewer than batch_size/num_workers = "
            f"{micro * cfg.grad_accum} records; use more data or a smaller --batch-size"
        )
    if state["step"] != saved["step"]:  # ran out of epochs between checkpoints
        save_checkpoint(last_metrics)


# ---------------------------------------------------------------------------------- driver
def _clean_failure(err: BaseException) -> str:
    """The most useful line of a worker failure (a RecordError / PretrainError message)."""
    text = str(err)
    for pattern in (r"RecordError: (.*)", r"PretrainError: (.*)", r"ConfigError: (.*)"):
        m = re.findall(pattern, text)
        if m:
            return m[-1].strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


def _with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Local paths made absolute: the Ray Train workers do not run in the caller's directory.

    ``vision``, ``llm`` and ``tokenizer`` may also be hub ids; only existing paths change.
    """
    changes: dict[str, str] = {}
    for name in ("data", "output", "image_folder", "init", "vision", "llm", "tokenizer"):
        value = getattr(cfg, name)
        if name == "vision" and value in VISION_ENCODERS:
            continue
        if value and (name in ("data", "output") or Path(value).exists()):
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(cfg, **changes)


class MetricsFollower:
    """The driver's view of a running pretraining: follows ``metrics.jsonl`` (rank 0 appends one
    row per optimiser step) in a thread, moves a tqdm bar over the steps (loss and samples/s
    beside it) and hands each new row to the trackers (W&B, MLflow)."""

    def __init__(
        self,
        path: Path,
        total: int,
        *,
        trackers: list[Any] | None = None,
        progress: bool = True,
        interval_s: float = 0.5,
    ):
        import threading

        from tqdm import tqdm

        self.path = Path(path)
        self.trackers = list(trackers or ())
        self.interval_s = interval_s
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.last_step = 0
        if self.path.is_file():  # a resumed run: the steps already done
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.last_step = max((int(r.get("step", 0)) for r in rows), default=0)
        self.bar = tqdm(
            total=total, initial=min(self.last_step, total), disable=not progress, unit="step"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-metrics", daemon=True)

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the rows written since the last poll
        self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> list[dict[str, Any]]:
        """Read the complete rows appended since the last call; returns the new ones."""
        if not self.path.is_file():
            return []
        size = self.path.stat().st_size
        if size < self.offset:  # rank 0 dropped the rows after a restored checkpoint
            self.offset = size
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        end = text.rfind("\n") + 1  # a line being written is read next time
        self.offset += len(text[:end].encode())
        new = []
        for line in text[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(row.get("step", 0))
            if step <= self.last_step:  # a replayed step after a restart
                continue
            self.last_step = step
            new.append(row)
            for tracker in self.trackers:
                tracker.log(row, step=step)
        if new:
            last = new[-1]
            self.bar.n = min(self.last_step, self.bar.total or self.last_step)
            postfix = {"loss": f"{last['loss']:.4f}"}
            if last.get("samples_per_s"):
                postfix["samples/s"] = f"{last['samples_per_s']:.1f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()
        return new


def total_steps(num_records: int, cfg: PretrainConfig) -> int:
    """Optimiser steps the run will take: ``max_steps``, or the epochs' steps if fewer."""
    per_epoch = steps_per_epoch(num_records, cfg)
    if cfg.max_steps is not None:
        return cfg.max_steps if cfg.epochs is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    return (cfg.epochs or 1) * per_epoch


def pretrain(cfg: PretrainConfig, trackers: list[Any] | None = None) -> dict[str, Any]:
    """Run one pretraining stage; returns the summary (also written to OUTPUT/summary.json).

    Progress (``cfg.progress``) is a tqdm bar over the optimiser steps; ``trackers`` (see
    :mod:`vla_ray.tracking`) get every step's row of ``metrics.jsonl``, and are finished with
    the summary (or the error) however the run ends."""
    summary: dict[str, Any] = {}
    try:
        summary = _pretrain(cfg, trackers)
    except Exception as err:
        summary = {"error": str(err).splitlines()[0] if str(err) else repr(err)}
        raise
    finally:
        for tracker in trackers or ():
            tracker.finish({k: v for k, v in summary.items() if isinstance(v, (str, int, float))})
    return summary


def _pretrain(cfg: PretrainConfig, trackers: list[Any] | None) -> dict[str, Any]:
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vla_ray.pretrain.data import load_records
    from vla_ray.train import init_ray

    cfg.check()
    cfg = _with_absolute_paths(cfg)
    vla_config = vla_config_for(cfg)
    out = Path(cfg.output).resolve()
    run_dir = out / RUN_NAME
    if cfg.resume and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} does not exist; nothing to resume")
    if not cfg.resume and run_dir.exists():
        raise ConfigError(
            f"output: {out} already holds a pretraining run; pass --resume to continue it "
            "or choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_records(cfg.data, cfg.image_folder, cfg.max_bad_fraction)
    with open(out / "bad_records.jsonl", "w") as f:
        for rid, reason in loaded.bad:
            f.write(json.dumps({"id": rid, "reason": reason}) + "\n")
    records = list(loaded.records)
    random.Random(cfg.seed).shuffle(records)
    per_worker = len(records) // cfg.num_workers
    if per_worker < cfg.batch_size // cfg.num_workers:
        raise ConfigError(
            f"batch_size: {len(records)} usable records give each of {cfg.num_workers} worker(s) "
            f"{per_worker}, fewer than one batch ({cfg.batch_size // cfg.num_workers} per worker)"
        )
    (out / "pretrain_config.json").write_text(
        json.dumps(
            {"pretrain": dataclasses.asdict(cfg), "vla_config": vla_config.to_dict()}, indent=2
        )
    )

    init_ray()
    # the driver's step bar (MetricsFollower) is the progress shown; Ray Data's would interleave
    ray.data.DataContext.get_current().enable_progress_bars = False
    # a few large blocks per worker: fewer round trips through the split coordinator
    ds = ray.data.from_items(records, override_num_blocks=4 * cfg.num_workers)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "pretrain": dataclasses.asdict(cfg),
            "vla_config": vla_config.to_dict(),
            "metrics_path": str(out / "metrics.jsonl"),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets={"train": ds},
    )
    if cfg.progress:
        print(
            f"pretrain {cfg.stage}: {len(records)} records, {cfg.num_workers} worker(s), "
            f"global batch {cfg.batch_size}, {cfg.strategy}, {cfg.precision} -> {out}",
            flush=True,
        )
    t0 = time.perf_counter()
    follower = MetricsFollower(
        out / "metrics.jsonl",
        total_steps(len(records), cfg),
        trackers=trackers,
        progress=cfg.progress,
    )
    try:
        with follower:
            result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - re-raised with the worker's message up front
        raise PretrainError(f"pretraining failed: {_clean_failure(err)}") from err
    if result.error is not None:
        raise PretrainError(f"pretraining failed: {_clean_failure(result.error)}")
    if result.checkpoint is None:
        raise PretrainError("pretraining produced no checkpoint")
    return _finish(result, records, loaded, vla_config, cfg, out, t0)


def _finish(
    result: Any,
    records: list[Any],
    loaded: Any,
    vla_config: VLAConfig,
    cfg: PretrainConfig,
    out: Path,
    t0: float,
) -> dict[str, Any]:
    """Export the VLM of the final checkpoint and write ``summary.json``."""
    vlm_dir = export_vlm(result.checkpoint, vla_config, cfg, out / VLM_DIR)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    summary = dict(
        stage=cfg.stage,
        records=len(records),
        bad_records=len(loaded.bad),
        steps=rows[-1]["step"] if rows else 0,
        final_loss=rows[-1]["loss"] if rows else None,
        num_workers=cfg.num_workers,
        wall_s=time.perf_counter() - t0,
        checkpoint=result.checkpoint.path,
        vlm=str(vlm_dir),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def export_vlm(checkpoint, vla_config: VLAConfig, cfg: PretrainConfig, target: Path) -> Path:
    """Write the checkpoint's weights as a ``VLA.save_pretrained`` directory (LoRA merged)."""
    import torch

    from vla_ray.models.vla import VLA

    torch.manual_seed(cfg.seed)
    vla = VLA(vla_config)
    with checkpoint.as_directory() as d:
        sd = torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True)
        step = json.loads((Path(d) / "state.json").read_text())["step"]
    missing, unexpected = vla.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise PretrainError(f"checkpoint does not match the model: {missing[:3]} {unexpected[:3]}")
    if vla_config.lora:
        vla.trunk.lm = vla.trunk.lm.merge_and_unload()
        plain = dataclasses.replace(vla_config, lora=None)
        vla.config = plain
        vla.trunk.config = plain
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        vla.save_pretrained(tmp / "vlm")
        (tmp / "vlm" / META_NAME).write_text(
            json.dumps(
                {"stage": cfg.stage, "step": step, "data": str(cfg.data), "init": cfg.init},
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "vlm", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def steps_per_epoch(num_records: int, cfg: PretrainConfig) -> int:
    """Optimiser steps in one epoch (per-worker share, whole micro-batches only)."""
    micro = cfg.batch_size // (cfg.num_workers * cfg.grad_accum)
    per_worker = num_records // cfg.num_workers
    return (per_worker // micro) // cfg.grad_accum if micro else 0
