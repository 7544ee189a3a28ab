"""LLaVA-layout VLM data: readers with per-record checks, a synthetic generator, tokenisation.

Layouts (as released by LLaVA):

- LLaVA-Pretrain (``blip_laion_cc_sbu_558k.json``): a json list of
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": caption}]}``; ``image`` is relative to an image folder.
- LLaVA-Instruct (``llava_instruct_150k.json``): the same record shape with several
  human/gpt turns; ``<image>`` appears once, in the first human turn.

``make_vlm_data`` renders LangReach scenes (the images the RL policy sees) and writes both
layouts plus an ``images/`` folder of PNGs, with captions and question/answer turns about the
discs' colours and positions, and the agent.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user :", "gpt": "assistant :"}
PRETRAIN_FILE = "llava_pretrain.json"
INSTRUCT_FILE = "llava_instruct.json"
IMAGE_DIR = "images"

# ---------------------------------------------------------------------------- synthetic scenes
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
CAPTION_PROMPTS = (
    "describe the image briefly .",
    "give a short caption of the scene .",
    "what is in this picture ?",
    "write a short description of the image .",
)


def position_phrase(x: float, y: float) -> str:
    """Arena coordinates in [-1, 1]^2 (y up) -> "at the top left", "in the center", ..."""
    col = "left" if x < -1 / 3 else "right" if x > 1 / 3 else ""
    row = "top" if y > 1 / 3 else "bottom" if y < -1 / 3 else ""
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the center"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]


def scene_texts(
    colors: Sequence[str],
    positions: np.ndarray,
    agent: np.ndarray,
    all_colors: Sequence[str],
    rng: np.random.Generator,
    num_questions: int = 3,
) -> tuple[str, list[tuple[str, str]]]:
    """A caption and ``num_questions`` (question, answer) pairs about one rendered scene."""
    where = [position_phrase(*p) for p in positions]
    agent_where = position_phrase(*agent)
    n = len(colors)
    discs = _join([f"a {c} disc {w}" for c, w in zip(colors, where, strict=True)])
    caption = f"{discs} . the white agent is {agent_where} ."
    dists = np.linalg.norm(positions - agent[None], axis=1)
    nearest = colors[int(np.argmin(dists))]

    def q_color() -> tuple[str, str] | None:
        unique = [i for i, w in enumerate(where) if where.count(w) == 1]
        if not unique:
            return None
        i = int(rng.choice(unique))
        return f"what color is the disc {where[i]} ?", f"it is {colors[i]} ."

    def q_where() -> tuple[str, str]:
        i = int(rng.integers(n))
        return f"where is the {colors[i]} disc ?", f"the {colors[i]} disc is {where[i]} ."

    def q_count() -> tuple[str, str]:
        word = "disc" if n == 1 else "discs"
        verb = "is" if n == 1 else "are"
        return "how many discs are there ?", f"there {verb} {NUMBERS[n]} {word} ."

    def q_exists() -> tuple[str, str]:
        c = str(rng.choice(list(all_colors)))
        if c in colors:
            return f"is there a {c} disc ?", f"yes , it is {where[colors.index(c)]} ."
        return f"is there a {c} disc ?", f"no , there is no {c} disc ."

    def q_agent() -> tuple[str, str]:
        return "where is the agent ?", f"the white agent is {agent_where} ."

    def q_nearest() -> tuple[str, str]:
        return "which disc is closest to the agent ?", f"the {nearest} disc ."

    makers = [q_color, q_where, q_count, q_exists, q_agent, q_nearest]
    qa: list[tuple[str, str]] = []
    for k in rng.permutation(len(makers)):
        item = makers[int(k)]()
        if item is not None:
            qa.append(item)
        if len(qa) == num_questions:
            break
    return caption, qa


def vlm_corpus() -> list[str]:
    """Every sentence shape the synthetic data uses (for the shipped tokenizer's vocabulary)."""
    from vla_ray.envs.langreach import COLORS

    colors = list(COLORS)
    rng = np.random.default_rng(0)
    texts = [*CAPTION_PROMPTS, *ROLES.values()]
    cells = [(x, y) for x in (-0.9, 0.0, 0.9) for y in (-0.9, 0.0, 0.9)]
    for n in range(1, len(colors) + 1):
        pos = np.array([cells[i % len(cells)] for i in range(n)], dtype=float)
        for agent in cells:
            cap, qa = scene_texts(colors[:n], pos, np.array(agent), colors, rng, num_questions=6)
            texts.append(cap)
            texts.extend(f"{q} {a}" for q, a in qa)
    texts.append(" ".join(NUMBERS))
    texts.append("there is no disc . it is one disc .")
    return texts


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def make_vlm_data(
    output: str | os.PathLike,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    max_targets: int = 4,
    progress: bool = True,
) -> dict[str, Path]:
    """Render ``n`` LangReach scenes and write both LLaVA layouts; returns the written paths.

    Scenes have 1..``max_targets`` discs (the first colours of LangReach's palette) and the
    white agent. ``llava_pretrain.json`` has one caption record per image,
    ``llava_instruct.json`` one multi-turn (2-4 questions) record per image.
    """
    from vla_ray.envs.langreach import COLORS, LangReachEnv

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of records, got {n!r}")
    if not 1 <= max_targets <= len(COLORS):
        raise ValueError(f"max_targets: expected 1..{len(COLORS)}, got {max_targets!r}")
    out = Path(output)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rng = np.random.default_rng(seed)
    envs = {
        k: LangReachEnv(image_size=image_size, num_targets=k) for k in range(1, max_targets + 1)
    }
    palette = list(COLORS)[:max_targets]
    pretrain, instruct = [], []
    try:
        for i in range(n):
            k = int(rng.integers(1, max_targets + 1))
            env = envs[k]
            obs, info = env.reset(seed=seed * 1_000_003 + i)
            name = f"{i:08d}.png"
            tmp = out / IMAGE_DIR / f".{name}.tmp"
            Image.fromarray(obs["image"]).save(tmp, format="PNG")
            os.replace(tmp, out / IMAGE_DIR / name)
            caption, qa = scene_texts(
                list(env.color_names),
                info["target_positions"],
                info["agent_position"],
                palette,
                rng,
                num_questions=int(rng.integers(2, 5)),
            )
            prompt = str(rng.choice(CAPTION_PROMPTS))
            first = f"{IMAGE_PLACEHOLDER}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
            pretrain.append(
                {
                    "id": f"{i:08d}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": first},
                        {"from": "gpt", "value": caption},
                    ],
                }
            )
            turns = []
            for j, (q, a) in enumerate(qa):
                turns.append(
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}" if j == 0 else q}
                )
                turns.append({"from": "gpt", "value": a})
            instruct.append({"id": f"{i:08d}", "image": name, "conversations": turns})
            if progress and (i + 1) % 500 == 0:
                print(f"make-vlm-data: {i + 1}/{n} scenes", file=sys.stderr, flush=True)
    finally:
        for env in envs.values():
            env.close()
    _write_json_atomic(out / PRETRAIN_FILE, pretrain)
    _write_json_atomic(out / INSTRUCT_FILE, instruct)
    return {
        "pretrain": out / PRETRAIN_FILE,
        "instruct": out / INSTRUCT_FILE,
        "images": out / IMAGE_DIR,
    }


# ------------------------------------------------------------------------------------ reading
class RecordError(ValueError):
    """A data record is unusable; the message names the record id and what is wrong."""


@dataclass
class LoadedData:
    """Checked records (image paths made absolute) and the rejected ones as (id, reason)."""

    records: list[dict[str, Any]]
    bad: list[tuple[str, str]]
    image_folder: Path


def read_json_records(path: str | os.PathLike) -> list[Any]:
    """A LLaVA json list (``.json``) or one record per line (``.jsonl``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data {p}: no such file (expected a LLaVA-style .json/.jsonl)")
    text = p.read_text()
    if p.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    out.append({"__error__": f"line {lineno}: invalid JSON ({err.msg})"})
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--data {p}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, list):
        raise ValueError(
            f"--data {p}: expected a json list of records (LLaVA layout), got {type(data).__name__}"
        )
    return data


def check_record(record: Any, image_folder: Path, index: int) -> tuple[dict[str, Any], str | None]:
    """Normalise one record; returns ``(record, None)`` or ``(partial, reason)`` when unusable.

    The normalised record has ``id`` (str), ``image`` (absolute path) and ``conversations``
    (a json string of alternating human/gpt turns with one ``<image>`` in the first human turn;
    it is prepended there when the record has an image but no placeholder, as LLaVA does).
    """
    if not isinstance(record, dict):
        return {"id": f"#{index}"}, f"expected a json object, got {type(record).__name__}"
    if "__error__" in record:
        return {"id": f"#{index}"}, record["__error__"]
    rid = str(record.get("id", f"#{index}"))
    out: dict[str, Any] = {"id": rid}
    image = record.get("image")
    if not isinstance(image, str) or not image:
        return out, "no 'image' path (text-only records are not supported)"
    path = Path(image) if Path(image).is_absolute() else image_folder / image
    if not path.is_file():
        return out, f"missing image {str(path)!r}"
    out["image"] = str(path)
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        return out, "'conversations' must be a list of at least one human and one gpt turn"
    turns = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return out, f"conversations[{t}]: expected {{'from': ..., 'value': str}}, got {turn!r}"
        role = turn.get("from")
        expected = "human" if t % 2 == 0 else "gpt"
        if role != expected:
            return (
                out,
                f"conversations[{t}]: 'from' should be {expected!r} (turns alternate), got {role!r}",
            )
        turns.append({"from": role, "value": turn["value"]})
    if turns[-1]["from"] != "gpt":
        return out, "conversations: the last turn must be a 'gpt' answer"
    counts = [t["value"].count(IMAGE_PLACEHOLDER) for t in turns]
    if sum(counts) > 1:
        return out, f"conversations: {sum(counts)} '<image>' placeholders, expected one"
    if sum(counts) == 1 and counts[0] != 1:
        return out, "conversations: '<image>' must be in the first human turn"
    if sum(counts) == 0:
        turns[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{turns[0]['value']}"
    out["conversations"] = json.dumps(turns)
    return out, None


def load_records(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    max_bad_fraction: float = 0.05,
    log: Any = None,
) -> LoadedData:
    """Read and check every record; report the bad ones by id and skip them.

    ``image_folder`` defaults to ``images/`` beside the json file (else the json's folder).
    Raises RecordError when no record is usable or more than ``max_bad_fraction`` are bad.
    """
    p = Path(path)
    if image_folder is None:
        image_folder = p.parent / IMAGE_DIR if (p.parent / IMAGE_DIR).is_dir() else p.parent
    folder = Path(image_folder).resolve()  # workers run in another directory
    raw = read_json_records(p)
    good, bad = [], []
    for i, rec in enumerate(raw):
        norm, reason = check_record(rec, folder, i)
        if reason is None:
            good.append(norm)
        else:
            bad.append((norm["id"], reason))
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if bad:
        for rid, reason in bad[:10]:
            log(f"bad record {rid}: {reason}")
        more = " (first 10 listed)" if len(bad) > 10 else ""
        log(f"skipping {len(bad)} of {len(raw)} records{more}")
    if not good:
        raise RecordError(f"--data {p}: none of the {len(raw)} records is usable")
    if len(bad) > max_bad_fraction * len(raw):
        rid, reason = bad[0]
        raise RecordError(
            f"--data {p}: {len(bad)} of {len(raw)} records are bad (more than "
            f"max_bad_fraction={max_bad_fraction:g}); first: record {rid}: {reason}"
        )
    return LoadedData(good, bad, folder)


# ------------------------------------------------------------------------------- tokenisation
@dataclass
class Example:
    """One tokenised conversation: ids, labels (-100 where no loss) and image-token positions."""

    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]


def build_example(
    conversations: Sequence[dict[str, str]],
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
) -> Example:
    """Tokenise human/gpt turns as ``user : ... assistant : ... [EOS]``.

    The ``<image>`` placeholder becomes ``num_image_tokens`` image positions (their ids are
    the ``<image>`` token, or pad when the tokenizer lacks it: the model overwrites their
    embeddings). Labels are the ids of assistant answers and their ``[EOS]``; everything else
    (roles, human text, image positions) is ``-100``. Truncated to ``max_length`` tokens.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_id is None or image_id == tokenizer.unk_token_id:
        image_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []

    ids: list[int] = []
    labels: list[int] = []
    image: list[bool] = []

    def add(tokens: list[int], learn: bool, is_image: bool = False) -> None:
        ids.extend(tokens)
        labels.extend(tokens if learn else [IGNORE_INDEX] * len(tokens))
        image.extend([is_image] * len(tokens))

    for turn in conversations:
        role = turn["from"]
        add(encode(ROLES[role]), False)
        if role == "human":
            parts = turn["value"].split(IMAGE_PLACEHOLDER)
            for k, part in enumerate(parts):
                if k > 0:
                    add([image_id] * num_image_tokens, False, is_image=True)
                add(encode(part), False)
        else:
            add(encode(turn["value"]) + [eos], True)
    return Example(ids[:max_length], labels[:max_length], image[:max_length])


def load_image(path: str, image_size: tuple[int, int], record_id: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) resized to ``image_size``; RecordError naming the record on failure."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (image_size[1], image_size[0]):
                img = img.resize((image_size[1], image_size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any decode failure is reported with the record id
        raise RecordError(f"record {record_id}: cannot read image {path!r}: {err}") from err


def collate(
    rows: dict[str, Iterable[Any]],
    tokenizer: Any,
    num_image_tokens: int,
    image_size: tuple[int, int],
    max_length: int,
) -> dict[str, Any]:
    """A batch of checked records -> numpy arrays: images, input_ids, attention_mask, labels,
    image_mask (right-padded to the longest example)."""
    ids_col = list(rows["id"])
    images = np.stack(
        [
            load_image(str(p), image_size, str(r))
            for p, r in zip(rows["image"], ids_col, strict=True)
        ]
    )
    examples = [
        build_example(json.loads(c), tokenizer, num_image_tokens, max_length)
        for c in rows["conversations"]
    ]
    for rid, ex in zip(ids_col, examples, strict=True):
        if sum(ex.image_mask) != num_image_tokens:
            raise RecordError(
                f"record {rid}: the image tokens do not fit in max_length={max_length}; "
                "raise --max-length"
            )
    L = max(len(ex.input_ids) for ex in examples)
    B = len(examples)
    input_ids = np.full((B, L), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    attn = np.zeros((B, L), dtype=np.int64)
    image_mask = np.zeros((B, L), dtype=bool)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = ex.input_ids
        labels[b, :n] = ex.labels
        attn[b, :n] = 1
        image_mask[b, :n] = ex.image_mask
    return {
        "images": images,
        "input_ids": input_ids,
        "attention_mask": attn,
        "labels": labels,
        "image_mask": image_mask,
    }
