"""Model cards: the ``README.md`` written beside a VLA (``save_pretrained``, checkpoints'
``vla/`` folders, ``vla-ray export``, ``push_to_hub``).

A card is Markdown with the YAML front matter the Hugging Face Hub reads (``library_name``,
``tags``, ``pipeline_tag``, ``license`` and, when an evaluation exists, ``model-index``), written
through ``huggingface_hub.ModelCardData``. The body says what the model is, the environment and
its observation / instruction format, the action space, how it was trained and its evaluation.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vla_ray.config import VLAConfig

CARD_NAME = "README.md"
LIBRARY_NAME = "vla-ray"
PIPELINE_TAG = "robotics"
LICENSE = "apache-2.0"
BASE_TAGS = ("vla-ray", "robotics", "vision-language-action", "reinforcement-learning")
EVAL_NAME = "eval.json"
META_NAME = "vla_ray_meta.json"
CONFIG_NAME = "vla_config.json"
WEIGHTS_NAME = "model.safetensors"


def find_eval(path: str | os.PathLike, levels: int = 3) -> dict[str, Any] | None:
    """The ``eval.json`` (a ``vla-ray eval --json`` result) in ``path`` or one of its ``levels``
    nearest parents (a quickstart writes it three levels above its checkpoint), if any."""
    p = Path(path).resolve()
    for folder in [p, *list(p.parents)[:levels]]:
        candidate = folder / EVAL_NAME
        if candidate.is_file():
            try:
                result = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            return result if isinstance(result, dict) and "success_rate" in result else None
    return None


def count_parameters(weights: str | os.PathLike) -> int | None:
    """Number of parameters in a safetensors file, read from its header (no tensor is loaded)."""
    try:
        with open(weights, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, item in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in item["shape"]:
            n *= int(d)
        total += n
    return total


def card_data(
    config: VLAConfig,
    meta: Mapping[str, Any] | None = None,
    eval_result: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """The card's front matter as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import EvalResult, ModelCardData

    meta = meta or {}
    tags = [*BASE_TAGS, f"head-{config.head}", f"backbone-{config.backbone}"]
    if meta.get("preset"):
        tags.append(str(meta["preset"]))
    results = None
    env = (eval_result or {}).get("env") or meta.get("env")
    if eval_result and env:
        episodes = eval_result.get("episodes")
        suffix = f" ({episodes} episodes)" if episodes else ""
        results = [
            EvalResult(
                task_type="reinforcement-learning",
                task_name="reinforcement-learning",
                dataset_type=str(env),
                dataset_name=str(env),
                metric_type=key,
                metric_value=round(float(eval_result[key]), 4),
                metric_name=label + suffix,
                verified=False,
            )
            for key, label in (("success_rate", "success rate"), ("mean_return", "mean return"))
            if isinstance(eval_result.get(key), (int, float))
        ]
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=LICENSE,
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        model_name=name or meta.get("preset") or "vla",
        eval_results=results or None,
    )


def _model_lines(config: VLAConfig, n_params: int | None) -> list[str]:
    lines = [f"- backbone: `{config.backbone}`"]
    if config.backbone == "vla":
        if config.vision != "none":
            lines.append(
                f"- vision encoder: `{config.vision}` ({config.image_size[0]}x"
                f"{config.image_size[1]} RGB)"
            )
            lines.append(f"- projector: `{config.projector}`, {config.projector_tokens} tokens")
        llm = config.llm_config or {}
        lm = llm.get("model_type") or "causal LM"
        size = ", ".join(f"{k} {llm[k]}" for k in ("hidden_size", "num_hidden_layers") if k in llm)
        lines.append(f"- language model: `{lm}`" + (f" ({size})" if size else ""))
    elif config.vlm_path:
        lines.append(f"- pretrained from: `{config.vlm_path}`")
    lines.append(f"- action head: `{config.head}`")
    if config.lora:
        lines.append(f"- LoRA: r={config.lora.get('r', '?')} (adapters in the language model)")
    if n_params:
        lines.append(f"- parameters: {n_params:,}")
    return lines


def _io_lines(config: VLAConfig, meta: Mapping[str, Any]) -> list[str]:
    h, w = config.image_size
    env = meta.get("env")
    lines = []
    if env:
        env_config = meta.get("env_config") or {}
        extra = f" with `env_config={json.dumps(env_config, sort_keys=True)}`" if env_config else ""
        lines.append(f"- environment: `{env}`{extra}")
    if config.vision != "none":
        if config.num_cameras > 1:
            lines.append(f"- `images`: uint8 ({config.num_cameras}, {h}, {w}, 3), RGB per camera")
        else:
            lines.append(f"- `image`: uint8 ({h}, {w}, 3), RGB, values 0-255")
    if config.state_dim > 0:
        lines.append(f"- `state`: float32 ({config.state_dim},), the raw proprioceptive state")
    example = f' (e.g. "{_example_instruction(meta)}")' if env and "LangReach" in str(env) else ""
    lines.append(
        f"- instruction: plain text{example}, tokenised with `tokenizer/` without special "
        f"tokens, at most {config.instruction_max_length} tokens"
    )
    return lines


def _example_instruction(meta: Mapping[str, Any]) -> str:
    return "reach the red target" if "LangReach" in str(meta.get("env")) else "do the task"


def _action_lines(config: VLAConfig) -> list[str]:
    A, K = config.action_dim, config.chunk_size
    lines = [
        f"- continuous, {A} dimension(s), each in [{config.action_low:g}, {config.action_high:g}]"
    ]
    if K > 1:
        lines.append(f"- action chunks: {K} steps per query, shape ({K}, {A})")
    else:
        lines.append(f"- one action per query, shape (1, {A})")
    return lines


def _training_lines(meta: Mapping[str, Any]) -> list[str]:
    preset = meta.get("preset")
    if not preset:
        return ["No training record was saved with this model (no `vla_ray_meta.json`)."]
    lines = [f"- preset: `{preset}`"]
    for key, label in (
        ("iteration", "training iterations"),
        ("env_steps", "environment steps"),
        ("num_env_steps_sampled_lifetime", "environment steps"),
    ):
        if meta.get(key) is not None:
            lines.append(f"- {label}: {meta[key]}")
    lines += [
        "",
        "Reproduce (the resolved settings are in `vla_ray_meta.json`):",
        "",
        "```bash",
        f"vla-ray train --preset {preset} --output runs/{preset}",
        "```",
    ]
    return lines


def _eval_lines(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Held-out evaluation (`vla-ray eval`, deterministic actions, "
        f"{result.get('episodes', '?')} episodes on `{result.get('env', '?')}`):",
        "",
        "| | success rate | mean return |",
        "|---|---|---|",
        f"| all | {result['success_rate']:.3f} | {result.get('mean_return', float('nan')):.3f} |",
    ]
    for target, rate in (result.get("success_by_target") or {}).items():
        lines.append(f"| {target} | {rate:.3f} | |")
    return lines


def _formats_lines(formats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| format | model file | max abs diff to PyTorch | tolerance |", "|---|---|---|---|"]
    for fmt, row in formats.items():
        lines.append(
            f"| `{fmt}` | `{row['model_file']}` | {row['max_abs_diff']:.2e} | {row['tolerance']:.0e} |"
        )
    lines += [
        "",
        "Each folder holds its `spec.json` (inputs, outputs, normalisation) and "
        "`tokenizer/`. Serve them with `vla-ray serve --model .`",
    ]
    return lines


def model_card(
    config: VLAConfig,
    meta: Mapping[str, Any] | None = None,
    eval_result: Mapping[str, Any] | None = None,
    formats: Mapping[str, Mapping[str, Any]] | None = None,
    n_params: int | None = None,
    name: str | None = None,
) -> str:
    """The card's text: front matter, then the model, its I/O, training, evaluation and usage.

    ``formats``: an export's per-format summary (``export.json``'s ``formats``), for the card at
    the root of an export; ``name``: the Hub repo id, when known.
    """
    meta = meta or {}
    data = card_data(config, meta, eval_result, name)
    title = name or (f"{meta['preset']} VLA policy" if meta.get("preset") else "VLA policy")
    load_from = name or "path/to/this/folder"
    where = f"{load_from}/pytorch" if formats and not name else load_from
    first = "images" if config.num_cameras > 1 else "image"
    act_args = [first if config.vision != "none" else "None", f'"{_example_instruction(meta)}"']
    if config.state_dim > 0:
        act_args.append("state")
    body = [
        f"# {title}",
        "",
        "A vision-language-action policy trained with vla-ray "
        "(Ray RLlib): it maps a camera image, an instruction and the proprioceptive state to "
        "continuous actions.",
        "",
        "## Model",
        "",
        *_model_lines(config, n_params),
        "",
        "## Observations and instruction",
        "",
        *_io_lines(config, meta),
        "",
        "## Action space",
        "",
        *_action_lines(config),
        "",
        "## Training",
        "",
        *_training_lines(meta),
        "",
        "## Evaluation",
        "",
        *(
            _eval_lines(eval_result)
            if eval_result
            else ["No evaluation was saved with this model."]
        ),
        "",
    ]
    if formats:
        body += ["## Exported formats", "", *_formats_lines(formats), ""]
    body += [
        "## Usage",
        "",
        "```python",
        "from vla_ray.models.vla import VLA",
        "",
        f'vla = VLA.from_pretrained("{where}")  # a local folder or a Hugging Face Hub id',
        f"chunk = vla.act({', '.join(act_args)})  # ({config.chunk_size}, {config.action_dim})",
        "```",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(
    directory: str | os.PathLike,
    *,
    meta: Mapping[str, Any] | None = None,
    eval_result: Mapping[str, Any] | None = None,
    formats: Mapping[str, Mapping[str, Any]] | None = None,
    config: VLAConfig | None = None,
    name: str | None = None,
) -> Path:
    """Write ``directory/README.md`` for the VLA saved there (or for an export: ``formats`` given,
    ``config`` and the weights read from its ``pytorch/``); ``meta`` defaults to the folder's
    ``vla_ray_meta.json``. Returns the card's path."""
    directory = Path(directory)
    model_dir = directory / "pytorch" if formats else directory
    if config is None:
        config = VLAConfig.load(model_dir / CONFIG_NAME)
    if meta is None and (model_dir / META_NAME).is_file():
        meta = json.loads((model_dir / META_NAME).read_text())
    text = model_card(
        config,
        meta,
        eval_result,
        formats,
        n_params=count_parameters(model_dir / WEIGHTS_NAME),
        name=name,
    )
    path = directory / CARD_NAME
    path.write_text(text)
    return path
