"""Start N CARLA server containers on this node, one per sub-environment of a run.

::

    python -m vla_ray.envs.carla_servers --n 4 --base-port 2000            # start 4, print env.servers
    python -m vla_ray.envs.carla_servers --n 4 --base-port 2000 --dry-run  # print the commands only
    python -m vla_ray.envs.carla_servers --stop                            # stop this node's servers

Server ``i`` listens on ``base_port + i * port_stride`` (it also uses the next two ports: streaming
and the multi-GPU secondary port), runs off-screen in ``carlasim/carla:<version>`` with
``--net=host``, on GPU ``gpus[i % len(gpus)]``, and is named ``vla-ray-carla-<port>``. The last
line printed is the ``--set`` for ``vla-ray train`` (``env.servers=localhost:2000,...``). Each
sub-env's Traffic Manager port is ``env.traffic_manager_port + i`` (default 8000 + i).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from vla_ray.envs.carla_env import DEFAULT_PORT_STRIDE, server_list

IMAGE = "carlasim/carla:0.9.16"
NAME_PREFIX = "vla-ray-carla-"
EXAMPLES = """examples:
  python -m vla_ray.envs.carla_servers --n 4 --base-port 2000            # start 4, print env.servers
  python -m vla_ray.envs.carla_servers --n 4 --gpus 0,1 --dry-run        # print the commands only
  python -m vla_ray.envs.carla_servers --stop                            # stop this node's servers
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, the examples as written."""


def server_commands(
    n: int,
    base_port: int,
    port_stride: int = DEFAULT_PORT_STRIDE,
    gpus: list[str] | None = None,
    image: str = IMAGE,
    quality: str = "Low",
) -> list[list[str]]:
    """The ``docker run`` command of each of ``n`` servers (ports checked as the env checks them)."""
    servers = server_list(
        host="localhost", base_port=base_port, num_servers=n, port_stride=port_stride
    )
    assert servers is not None
    gpus = gpus or ["all"]
    commands = []
    for i, server in enumerate(servers):
        gpu = gpus[i % len(gpus)]
        device = "all" if gpu == "all" else f"device={gpu}"
        commands.append(
            [
                "docker",
                "run",
                "-d",
                "--rm",
                "--name",
                f"{NAME_PREFIX}{server.port}",
                "--net=host",
                "--gpus",
                device,
                image,
                "bash",
                "CarlaUE4.sh",
                "-RenderOffScreen",
                "-nosound",
                f"-quality-level={quality}",
                f"-carla-rpc-port={server.port}",
            ]
        )
    return commands


def servers_setting(n: int, base_port: int, port_stride: int = DEFAULT_PORT_STRIDE) -> str:
    """``env.servers=...`` for ``vla-ray train --set`` naming the ``n`` servers on this node."""
    servers = server_list(
        host="localhost", base_port=base_port, num_servers=n, port_stride=port_stride
    )
    assert servers is not None
    return "env.servers=" + ",".join(s.address for s in servers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vla_ray.envs.carla_servers",
        description="Start N CARLA server containers on this node (one per CARLA sub-env).",
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--n", type=int, default=1, help="number of servers")
    parser.add_argument("--base-port", type=int, default=2000, help="RPC port of server 0")
    parser.add_argument(
        "--port-stride", type=int, default=DEFAULT_PORT_STRIDE, help="ports between servers"
    )
    parser.add_argument(
        "--gpus", default="all", help="comma-separated GPU ids, used round-robin; 'all': every GPU"
    )
    parser.add_argument("--image", default=IMAGE, help="CARLA server image (match the client)")
    parser.add_argument("--quality", choices=("Low", "Epic"), default="Low", help="render quality")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--stop", action="store_true", help="stop this node's vla-ray servers")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stop:
        names = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"name={NAME_PREFIX}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if names:
            subprocess.run(["docker", "stop", *names], check=True)
        print(f"stopped {len(names)} CARLA server(s)")
        return 0
    if args.n < 1:
        print(f"--n: expected a positive integer, got {args.n}", file=sys.stderr)
        return 2
    try:
        commands = server_commands(
            args.n, args.base_port, args.port_stride, args.gpus.split(","), args.image, args.quality
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for cmd in commands:
        print(shlex.join(cmd))
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    print(servers_setting(args.n, args.base_port, args.port_stride))
    return 0


if __name__ == "__main__":
    sys.exit(main())
