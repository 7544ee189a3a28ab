"""RLDS / Open X-Embodiment datasets as TFDS builds them, read without TensorFlow.

A TFDS-built RLDS dataset is a folder ``<name>/<version>/`` holding ``dataset_info.json`` (name,
version, splits with ``shardLengths``), ``features.json`` (the ``FeaturesDict`` schema, with a
``Dataset`` feature ``steps``) and shards ``<name>-<split>.tfrecord-NNNNN-of-MMMMM``. Each record
is one episode, a ``tf.train.Example`` whose keys are the feature paths joined by ``/``: every
step feature is stored once for the whole episode, its values concatenated over the steps
(``steps/observation/image``: one encoded JPEG/PNG per step; ``steps/action``: T x 7 floats;
booleans as int64; text as bytes); episode-level features (``episode_metadata/...``) once.

Mapping (:data:`MAPPINGS`, chosen by name): which step features are the cameras (in order),
the state and the action (several are concatenated, e.g. RT-1's ``world_vector``,
``rotation_delta``, ``gripper_closedness_action``) and the instruction. ``generic`` takes every
image under ``observation`` (schema order), ``observation/state`` and ``action``, and
``language_instruction`` or ``observation/natural_language_instruction``. Onto the contract:
cameras by name, the only one also ``image``, two or more of one shape also ``images``
(T, N, H, W, 3); ``state`` float32; other ``observation`` tensors by their name.

RLDS stores the observation before each action and no observation after the last one: the
reader repeats the last observation as the final one (as for LeRobotDataset). An episode ends
terminated when its last step ``is_terminal``, else truncated.

A dataset *spec file* (JSON, ``"format": "rlds"``) names the folder (``path``, relative to the
file), ``split``, ``mapping`` (a name or a dict) and ``filter`` (``episodes`` "start:stop",
``min_length``, ``max_length``, ``instruction_contains``); it is what ``vla-ray train --data``
takes when the defaults (split ``train``, mapping by dataset name, no filter) do not fit.

Tested on: shards written in tests from the published layout (TFDS ``features.json`` schemas of
Bridge / DROID / RT-1 as published with the datasets, TFDS's flattened Example serialisation),
not on a real downloaded OXE dataset (no network here).
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vla_ray.data.contract import RawEpisode
from vla_ray.data.rllib_format import DataError
from vla_ray.data.tfrecord import iter_records, parse_example, read_record

FORMAT = "rlds"
SHARD = re.compile(r"^(?P<name>.+)-(?P<split>[^-]+)\.tfrecord-(?P<i>\d{5})-of-(?P<n>\d{5})$")
FILTER_KEYS = ("episodes", "min_length", "max_length", "instruction_contains")


@dataclass(frozen=True)
class Mapping:
    """Step feature paths (relative to ``steps/``) for each contract field; ``images`` maps a
    camera name to its feature, in the order of the ``images`` observation. None/empty: found
    by the generic rules (see the module doc)."""

    images: dict[str, str] = field(default_factory=dict)
    state: tuple[str, ...] = ()
    action: tuple[str, ...] = ("action",)
    instruction: str | None = None


MAPPINGS: dict[str, Mapping] = {
    "generic": Mapping(),
    # BridgeData V2 (rail-berkeley bridge_dataset, Octo/OpenVLA's "bridge_orig"): 4 cameras
    # (image_0 over-the-shoulder .. image_3; wrist is image_3), state 7, action 7
    "bridge": Mapping(
        images={"image_0": "observation/image_0", "image_1": "observation/image_1"},
        state=("observation/state",),
        action=("action",),
        instruction="language_instruction",
    ),
    # RT-1 (fractal20220817_data): one camera, action a dict of parts
    "fractal": Mapping(
        images={"image": "observation/image"},
        state=("observation/base_pose_tool_reached", "observation/gripper_closed"),
        action=("action/world_vector", "action/rotation_delta", "action/gripper_closedness_action"),
        instruction="observation/natural_language_instruction",
    ),
}
# dataset names (dataset_info.json) with their own mapping
MAPPING_BY_NAME = {
    "bridge_dataset": "bridge",
    "bridge_orig": "bridge",
    "fractal20220817_data": "fractal",
}


@dataclass(frozen=True)
class Spec:
    """A resolved dataset: its version folder, split, mapping and episode filter."""

    root: Path
    split: str = "train"
    mapping: Mapping = field(default_factory=Mapping)
    filter: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- locating
def _version_dir(path: Path) -> Path | None:
    if (path / "features.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    if path.is_dir():  # <name>/ holding <version>/ folders: the newest
        found = [p for p in path.iterdir() if (p / "features.json").is_file()]
        if found:
            return max(found, key=lambda p: tuple(int(x) for x in re.findall(r"\d+", p.name)))
    return None


def is_spec_file(path: Path) -> bool:
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError, OSError):
        return False


def is_rlds(path: Path) -> bool:
    return is_spec_file(path) or _version_dir(path) is not None


def load_spec(path: str | os.PathLike) -> Spec:
    """The dataset at ``path`` (a version folder, its parent, or a spec file), checked."""
    p = Path(path)
    options: dict[str, Any] = {}
    if is_spec_file(p):
        options = json.loads(p.read_text())
        unknown = sorted(set(options) - {"format", "path", "split", "mapping", "filter"})
        if unknown:
            raise DataError(
                f"{p}: unknown field(s) {unknown} (known: path, split, mapping, filter)"
            )
        if "path" not in options:
            raise DataError(f"{p}: field 'path' missing (the RLDS dataset folder)")
        p = (p.parent / options["path"]).resolve()
    root = _version_dir(p)
    if root is None:
        raise DataError(
            f"data: {p} is not a TFDS-built RLDS dataset (expected features.json and "
            "dataset_info.json in it or in a version folder under it)"
        )
    info = _json(root / "dataset_info.json")
    mapping = options.get("mapping", MAPPING_BY_NAME.get(info.get("name", ""), "generic"))
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise DataError(f"data: mapping {mapping!r} is not known (known: {sorted(MAPPINGS)})")
        mapping = MAPPINGS[mapping]
    elif isinstance(mapping, dict):
        try:
            mapping = Mapping(
                images=dict(mapping.get("images", {})),
                state=tuple(mapping.get("state", ())),
                action=tuple(mapping.get("action", ("action",))),
                instruction=mapping.get("instruction"),
            )
        except TypeError as err:
            raise DataError(f"{path}: field 'mapping' is not a valid mapping ({err})") from err
    filt = dict(options.get("filter", {}))
    unknown = sorted(set(filt) - set(FILTER_KEYS))
    if unknown:
        raise DataError(f"{path}: unknown filter field(s) {unknown} (known: {list(FILTER_KEYS)})")
    return Spec(root=root, split=options.get("split", "train"), mapping=mapping, filter=filt)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"data: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


# ----------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Leaf:
    """One stored feature: ``kind`` image / tensor / text, per-step (or episode) shape."""

    kind: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    encoding: str = "none"


def _leaves(node: dict[str, Any], prefix: str, out: dict[str, Leaf], where: Path) -> None:
    if "featuresDict" in node:
        for key, sub in node["featuresDict"].get("features", {}).items():
            _leaves(sub, f"{prefix}{key}/", out, where)
    elif "sequence" in node:
        _leaves(node["sequence"]["feature"], prefix, out, where)
    elif "image" in node:
        img = node["image"]
        dims = tuple(int(d) for d in img.get("shape", {}).get("dimensions", []))
        out[prefix[:-1]] = Leaf(
            "image", dims, img.get("dtype", "uint8"), img.get("encodingFormat", "png")
        )
    elif "tensor" in node:
        t = node["tensor"]
        dims = tuple(int(d) for d in t.get("shape", {}).get("dimensions", []))
        kind = "text" if t.get("dtype") == "string" else "tensor"
        out[prefix[:-1]] = Leaf(kind, dims, t.get("dtype", "float32"), t.get("encoding", "none"))
    elif "text" in node:
        out[prefix[:-1]] = Leaf("text")
    elif "classLabel" in node:
        out[prefix[:-1]] = Leaf("tensor", (), "int64")
    else:
        raise DataError(
            f"{where}: feature {prefix[:-1]!r} has an unsupported type ({sorted(node)})"
        )


@lru_cache(maxsize=8)
def schema(root: str) -> dict[str, Leaf]:
    """``features.json`` as ``{flat feature path: Leaf}`` (``steps/...`` and episode features)."""
    path = Path(root) / "features.json"
    out: dict[str, Leaf] = {}
    _leaves(_json(path), "", out, path)
    if not any(k.startswith("steps/") for k in out):
        raise DataError(f"{path}: no 'steps' features (not an RLDS dataset)")
    return out


# ----------------------------------------------------------------------------- episodes
def shards(spec: Spec) -> list[Path]:
    info = _json(spec.root / "dataset_info.json")
    splits = {s.get("name"): s for s in info.get("splits", [])}
    if splits and spec.split not in splits:
        raise DataError(
            f"{spec.root / 'dataset_info.json'}: split {spec.split!r} not found "
            f"(splits: {sorted(splits)})"
        )
    name = info.get("name", "")
    files = sorted(
        p
        for p in spec.root.iterdir()
        if (m := SHARD.match(p.name))
        and m["split"] == spec.split
        and (not name or m["name"] == name)
    )
    if not files:
        raise DataError(f"{spec.root}: no {spec.split!r} shards ({name}-{spec.split}.tfrecord-*)")
    expected = int(SHARD.match(files[0].name)["n"])
    if len(files) != expected:
        raise DataError(
            f"{spec.root}: {len(files)} {spec.split!r} shards, the names say {expected}"
        )
    lengths = splits.get(spec.split, {}).get("shardLengths")
    if lengths is not None and len(lengths) != len(files):
        raise DataError(
            f"{spec.root / 'dataset_info.json'}: {len(lengths)} shardLengths for "
            f"{len(files)} shard files of split {spec.split!r}"
        )
    return files


def episode_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One reference per episode kept by the filter (shard file, byte offset, index). Filters
    on length or instruction parse each episode once here."""
    spec = load_spec(path)
    schema(str(spec.root))
    filt = spec.filter
    lo, hi = 0, None
    if "episodes" in filt:
        m = re.fullmatch(r"(\d*):(\d*)", str(filt["episodes"]))
        if m is None:
            raise DataError(
                f"{path}: filter 'episodes' must be 'start:stop', got {filt['episodes']!r}"
            )
        lo, hi = int(m[1] or 0), int(m[2]) if m[2] else None
    content = any(k in filt for k in ("min_length", "max_length", "instruction_contains"))
    refs, index = [], 0
    for shard in shards(spec):
        for offset, data in iter_records(shard):
            i = index
            index += 1
            if i < lo or (hi is not None and i >= hi):
                continue
            ref = {"path": str(path), "shard": str(shard), "offset": offset, "index": i}
            if content and not _keep(_decode(spec, data, ref, images=False), filt):
                continue
            refs.append(ref)
    return refs


def _keep(raw: RawEpisode, filt: dict[str, Any]) -> bool:
    n = len(raw.actions)
    if n < int(filt.get("min_length", 1)):
        return False
    if "max_length" in filt and n > int(filt["max_length"]):
        return False
    text = filt.get("instruction_contains")
    return not text or text.lower() in (raw.instruction or "").lower()


def read_episode(path: str | os.PathLike, ref: dict[str, Any]) -> RawEpisode:
    """One episode, decoded and mapped (see the module doc)."""
    spec = load_spec(ref.get("path", path))
    data = read_record(ref["shard"], int(ref["offset"]))
    return _decode(spec, data, ref, images=True)


def _steps(values: list[Any], leaf: Leaf, name: str, where: str) -> tuple[np.ndarray | list, int]:
    """A step feature's values and its number of steps."""
    if leaf.kind in ("image", "text"):
        return values, len(values)
    per = int(np.prod(leaf.shape)) if leaf.shape else 1
    if leaf.encoding in ("bytes", "zlib"):
        raw = [zlib.decompress(v) if leaf.encoding == "zlib" else v for v in values]
        arr = np.stack([np.frombuffer(v, dtype=leaf.dtype) for v in raw]) if raw else np.zeros(0)
        arr = arr.reshape(-1)
    else:
        arr = np.asarray(values)
    if per <= 0 or (per and arr.size % per):
        raise DataError(
            f"{where}: field {name!r} has {arr.size} values, not a multiple of its per-step shape "
            f"{list(leaf.shape)}"
        )
    n = arr.size // per if per else 0
    dtype = "float32" if leaf.dtype in ("float64", "float16", "bfloat16") else leaf.dtype
    return arr.reshape(n, *leaf.shape).astype(dtype, copy=False), n


def _image(data: bytes, leaf: Leaf, name: str, where: str, step: int) -> np.ndarray:
    from PIL import Image

    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL: truncated or unknown image data
        raise DataError(
            f"{where} step {step}: field {name!r} is not a readable image ({err})"
        ) from err
    want = leaf.shape
    if len(want) == 3 and any(w > 0 and w != g for w, g in zip(want, img.shape, strict=True)):
        raise DataError(
            f"{where} step {step}: field {name!r} has an image of shape {img.shape}, "
            f"features.json gives {list(want)}"
        )
    return img


def _decode(spec: Spec, data: bytes, ref: dict[str, Any], *, images: bool) -> RawEpisode:
    where = f"{ref['shard']} episode {ref['index']}"
    feats = parse_example(data, where)
    leaves = schema(str(spec.root))
    mapping = spec.mapping
    step_keys = [k for k in leaves if k.startswith("steps/")]
    missing = [k for k in step_keys if k not in feats]
    if missing:
        raise DataError(f"{where}: field {missing[0]!r} missing (features.json lists it)")
    steps: dict[str, Any] = {}
    n = None
    for key in step_keys:
        leaf = leaves[key]
        name = key.removeprefix("steps/")
        if leaf.kind == "image" and not images:
            steps[name], count = feats[key], len(feats[key])
        else:
            steps[name], count = _steps(feats[key], leaf, key, where)
        if n is None:
            n = count
        elif count != n:
            raise DataError(f"{where}: field {key!r} has {count} steps, other step fields have {n}")
    if not n:
        raise DataError(f"{where}: episode has no steps")

    def need(name: str, role: str) -> Any:
        if name not in steps:
            raise DataError(
                f"{where}: {role} field 'steps/{name}' missing (step fields: {sorted(steps)})"
            )
        return steps[name]

    cameras = mapping.images or {
        k.split("/")[-1]: k
        for k in steps
        if k.startswith("observation/") and leaves[f"steps/{k}"].kind == "image"
    }
    obs: dict[str, np.ndarray] = {}
    for key, value in steps.items():  # every other observation tensor by its name
        if key.startswith("observation/") and leaves[f"steps/{key}"].kind == "tensor":
            obs[key.removeprefix("observation/").replace("/", ".")] = value
    if images:
        for cam, key in cameras.items():
            leaf = leaves.get(f"steps/{key}")
            if leaf is None or leaf.kind != "image":
                raise DataError(f"{where}: camera {cam!r}: 'steps/{key}' is not an image feature")
            obs[cam] = np.stack(
                [
                    _image(b, leaf, f"steps/{key}", where, t)
                    for t, b in enumerate(need(key, "camera"))
                ]
            )
        if len(cameras) == 1:
            obs["image"] = obs[next(iter(cameras))]
        elif cameras and len({obs[c].shape for c in cameras}) == 1:
            obs["images"] = np.stack([obs[c] for c in cameras], axis=1)
    state_keys = mapping.state or (("observation/state",) if "observation/state" in steps else ())
    if state_keys:
        parts = [np.asarray(need(k, "state"), np.float32).reshape(n, -1) for k in state_keys]
        obs["state"] = np.concatenate(parts, axis=1)
    obs = {k: np.concatenate([v, v[-1:]]) for k, v in obs.items()}  # final obs: see module doc
    actions = np.concatenate(
        [np.asarray(need(k, "action"), np.float32).reshape(n, -1) for k in mapping.action], axis=1
    )
    rewards = (
        np.asarray(steps["reward"], np.float64).reshape(n) if "reward" in steps else np.zeros(n)
    )
    terminal = (
        bool(np.asarray(steps["is_terminal"]).reshape(-1)[-1]) if "is_terminal" in steps else False
    )
    text_key = mapping.instruction or next(
        (
            k
            for k in ("language_instruction", "observation/natural_language_instruction")
            if k in steps
        ),
        None,
    )
    text = None
    if text_key is not None:
        texts = [
            t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
            for t in need(text_key, "instruction")
        ]
        text = next((t for t in texts if t), None)
    return RawEpisode(
        observations=obs,
        actions=actions,
        rewards=rewards,
        terminated=terminal,
        truncated=not terminal,
        instruction=text,
        source=where,
    )
