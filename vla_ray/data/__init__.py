"""Offline data: collecting episodes and reading/writing datasets for offline RL and imitation."""

from vla_ray.data.collect import FORMATS, collect
from vla_ray.data.convert import convert_to_rllib, detect_format, offline_input, read_dataset
from vla_ray.data.rllib_format import (
    DataError,
    check_episodes,
    dataset_files,
    read_episodes,
    read_meta,
    write_episodes,
)

__all__ = [
    "FORMATS",
    "DataError",
    "check_episodes",
    "collect",
    "convert_to_rllib",
    "detect_format",
    "offline_input",
    "read_dataset",
    "dataset_files",
    "read_episodes",
    "read_meta",
    "write_episodes",
]
