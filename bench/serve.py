"""Benchmark: the Serve endpoint (p50/p99 latency, actions/s at several concurrencies, torch and
ONNX backends; ``/v1/act`` with one observation per request and ``/v1/act_batch`` with ROWS
observations per request) and direct inference (eager torch vs onnxruntime fp32 (one graph, and
the prefix/suffix graphs with the instruction-prefix cache) vs INT8, ...).

The model is the langreach-ppo preset's policy config, built from LangReach's spaces and randomly
initialised (timing does not depend on the weights). Requests are real LangReach observations
(64x64 PNG, instruction, state) sent over HTTP/1.1 keep-alive connections from an asyncio client
in this process. Prints tables and writes ``OUT/serve.json``.

    python bench/serve.py --out docs/bench
    python bench/serve.py --batch-route 32x1 8x4   # ROWSxCONCURRENCY on /v1/act_batch
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
# Ray starts its worker processes (Serve's proxy and replicas included) at niceness 15 by
# default; a latency benchmark runs them at normal priority like the client.
os.environ.setdefault("RAY_worker_niceness", "0")

ENV = "vla_ray/LangReach-v0"


def build_model(directory: Path, chunk_size: int = 1) -> Path:
    """langreach-ppo's policy (random init) as a save_pretrained dir; chunk_size > 1 widens
    the action space to chunks of that many steps."""
    import gymnasium as gym
    import torch

    import vla_ray.envs  # noqa: F401
    from vla_ray.presets import get_preset
    from vla_ray.rl_module import VLAModule

    torch.manual_seed(0)
    env = gym.make(ENV)
    act = env.action_space
    if chunk_size > 1:
        act = gym.spaces.Box(
            np.tile(act.low, chunk_size), np.tile(act.high, chunk_size), dtype=np.float32
        )
    model = {**get_preset("langreach-ppo").model, "chunk_size": chunk_size}
    module = VLAModule(
        observation_space=env.observation_space,
        action_space=act,
        model_config=model,
        inference_only=True,
    )
    env.close()
    return module.vla.save_pretrained(directory)


def observations(n: int = 8) -> list[tuple[dict[str, np.ndarray], str]]:
    import gymnasium as gym

    import vla_ray.envs  # noqa: F401

    env = gym.make(ENV)
    out = []
    for seed in range(n):
        obs, info = env.reset(seed=seed)
        out.append((obs, info["instruction"]))
    env.close()
    return out


def time_calls(fn, inputs, seconds: float, min_calls: int = 20) -> float:
    """Median seconds per call of ``fn(inputs)`` over ~``seconds``, after warm-up."""
    for _ in range(5):
        fn(inputs)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < min_calls:
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def direct_rows(export_dir: Path, obs, batch_sizes, seconds: float) -> list[dict[str, Any]]:
    """Direct inference (no HTTP), one intra-op thread, on real observations."""
    import torch

    from vla_ray.export import OnnxRunner, load_runner, read_spec
    from vla_ray.models.vla import VLA
    from vla_ray.tokenizer import encode_instructions

    torch.set_num_threads(1)
    vla = VLA.from_pretrained(export_dir / "pytorch").eval()
    runtimes = {
        "torch eager (memoised prefix)": lambda x: vla.predict(x),
        "torch eager (functional graph)": lambda x: _functional(vla, x),
    }
    for fmt, label in (
        ("torchscript", "torchscript"),
        ("onnx", "onnxruntime fp32"),
        ("onnx-int8", "onnxruntime int8"),
        ("onnx-fp16", "onnxruntime fp16"),
        ("openvino", "openvino fp32"),
    ):
        if not (export_dir / fmt).is_dir():
            continue
        if fmt == "onnx":  # the single graph (every row's prefix encoded), then the split one
            spec = read_spec(export_dir / fmt)
            runtimes[label] = OnnxRunner(export_dir / fmt / spec["model_file"], threads=1)
            if "prefix_cache" in spec:
                runtimes[f"{label}, prefix cache"] = load_runner(export_dir / fmt, threads=1)
            continue
        runtimes[label] = load_runner(export_dir / fmt, threads=1)
    rows = []
    for b in batch_sizes:
        pick = [obs[i % len(obs)] for i in range(b)]
        ids, mask = encode_instructions([t for _, t in pick], 16, vla.tokenizer)
        x = {
            "image": np.stack([o["image"] for o, _ in pick]),
            "state": np.stack([o["state"] for o, _ in pick]).astype(np.float32),
            "instruction": ids,
            "instruction_mask": mask,
        }
        base = None
        for name, fn in runtimes.items():
            sec = time_calls(fn, x, seconds)
            base = base or sec
            rows.append(
                dict(
                    runtime=name,
                    batch=b,
                    ms_per_call=round(sec * 1e3, 3),
                    actions_per_s=round(b / sec, 1),
                    speedup_vs_torch_eager=round(base / sec, 2),
                )
            )
            print(f"direct {name:<32} batch {b:>3}: {sec * 1e3:8.3f} ms", flush=True)
    return rows


def _functional(vla, x):
    import torch

    with torch.no_grad():
        obs = {k: torch.as_tensor(v) for k, v in x.items()}
        return vla.head.predict(vla.trunk.forward_functional(obs), deterministic=True)


async def load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` closed loops posting back-to-back for ``seconds``; client-side latency.
    A ``/v1/act_batch`` answer counts its rows' actions (a failed row is an error)."""
    import aiohttp

    latencies: list[float] = []
    server_ms: list[float] = []
    errors = 0
    actions = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> tuple[float, dict[str, Any] | None]:
            t0 = time.perf_counter()
            async with session.post(
                url, data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
            ) as resp:
                answer = await resp.json() if resp.status == 200 else None
            return time.perf_counter() - t0, answer

        async def loop(worker: int, t_end: float, record: bool) -> None:
            nonlocal errors, actions
            i = worker
            while time.perf_counter() < t_end:
                dt, answer = await one(i)
                i += concurrency
                if not record:
                    continue
                if answer is None:
                    errors += 1
                    continue
                latencies.append(dt)
                server_ms.append(answer["latency_ms"])
                for row in answer.get("results", [answer]):
                    if row.get("status", 200) == 200:
                        actions += len(row["actions"])
                    else:
                        errors += 1

        warm_end = time.perf_counter() + min(2.0, seconds / 3)
        await asyncio.gather(*(loop(w, warm_end, False) for w in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(w, t0 + seconds, True) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return dict(
        requests=len(latencies),
        errors=errors,
        p50_ms=round(float(np.percentile(lat, 50)), 2),
        p99_ms=round(float(np.percentile(lat, 99)), 2),
        server_p50_ms=round(float(np.median(server_ms)), 2),
        requests_per_s=round(len(latencies) / elapsed, 1),
        actions_per_s=round(actions / elapsed, 1),
    )


def serve_rows(
    export_dir: Path,
    backend: str,
    obs,
    concurrencies,
    seconds: float,
    replicas: int,
    max_batch_size: int,
    batch_wait_ms: float,
    chunk_size: int,
    batch_route: list[tuple[int, int]] = (),
) -> list[dict[str, Any]]:
    """``/v1/act`` at each concurrency, then ``/v1/act_batch`` at each (rows, concurrency)."""
    from ray import serve

    from vla_ray.serve.app import ServeSettings, build_app
    from vla_ray.serve.client import act_batch_body, act_body, free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        ServeSettings(
            model=str(export_dir),
            backend=backend,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_ms / 1e3,
        ),
        num_replicas=replicas,
        replica_cpus=0.5,
        access_log=False,
    )
    serve.run(app, name="bench", route_prefix="/")
    bodies = [json.dumps(act_body(o["image"], t, o["state"])).encode() for o, t in obs]
    url = f"http://127.0.0.1:{port}"
    levels = [("/v1/act", 1, c) for c in concurrencies]
    levels += [("/v1/act_batch", n, c) for n, c in batch_route]
    rows = []
    try:
        for route, n, c in levels:
            if route == "/v1/act":
                sent = bodies
            else:  # N observations per request, cycling through the observations
                sent = []
                for start in range(len(obs)):
                    pick = [obs[(start + i) % len(obs)] for i in range(n)]
                    body = act_batch_body(
                        [o["image"] for o, _ in pick],
                        [t for _, t in pick],
                        [o["state"] for o, _ in pick],
                    )
                    sent.append(json.dumps(body).encode())
            r = asyncio.run(load(url + route, sent, c, seconds))
            row = dict(
                backend=backend,
                route=route,
                rows_per_request=n,
                chunk_size=chunk_size,
                replicas=replicas,
                max_batch_size=max_batch_size,
                concurrency=c,
                observations_in_flight=n * c,
                **r,
            )
            rows.append(row)
            print(
                f"serve {backend:<5} {route:<13} rows={n:>3} K={chunk_size} c={c:>3}: "
                f"p50 {r['p50_ms']:7.2f} ms  "
                f"p99 {r['p99_ms']:7.2f} ms  {r['actions_per_s']:8.1f} actions/s  "
                f"(server p50 {r['server_p50_ms']} ms, {r['errors']} errors)",
                flush=True,
            )
    finally:
        serve.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=[1, 8], help="model chunk sizes (onnx)"
    )
    parser.add_argument(
        "--batch-route",
        nargs="*",
        default=["32x1", "8x4"],
        metavar="ROWSxCONC",
        help="/v1/act_batch levels: ROWS observations per request, CONC concurrent requests",
    )
    parser.add_argument("--direct-batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--direct-seconds", type=float, default=3.0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="serve", help="results file: OUT/NAME.json")
    args = parser.parse_args()
    batch_route = []
    for level in args.batch_route:
        rows, _, conc = level.partition("x")
        if not (rows.isdigit() and conc.isdigit() and int(rows) >= 1 and int(conc) >= 1):
            parser.error(f"--batch-route: expected ROWSxCONC such as 32x1, got {level!r}")
        batch_route.append((int(rows), int(conc)))

    from vla_ray.export import export
    from vla_ray.train import init_ray

    load_before = os.getloadavg()
    obs = observations()
    work = Path(tempfile.mkdtemp(prefix="vla-serve-bench-"))
    exports = {}
    for k in sorted(set([1, *args.chunk_sizes])):
        src = build_model(work / f"vla-k{k}", chunk_size=k)
        fmts = "onnx,onnx-int8,onnx-fp16,torchscript,openvino" if k == 1 else "onnx"
        try:
            export(src, fmts, work / f"export-k{k}", progress=None)
        except ValueError:  # openvino missing
            fmts = fmts.replace(",openvino", "")
            export(src, fmts, work / f"export-k{k}", progress=None)
        exports[k] = work / f"export-k{k}"

    direct = direct_rows(exports[1], obs, args.direct_batch, args.direct_seconds)

    init_ray(num_cpus=os.cpu_count())
    served = []
    for backend in args.backends:
        served += serve_rows(
            exports[1],
            backend,
            obs,
            args.concurrency,
            args.seconds,
            args.replicas,
            args.max_batch_size,
            args.batch_wait_ms,
            1,
            batch_route,
        )
    for k in args.chunk_sizes:
        if k == 1:
            continue
        served += serve_rows(
            exports[k],
            "onnx",
            obs,
            args.concurrency,
            args.seconds,
            args.replicas,
            args.max_batch_size,
            args.batch_wait_ms,
            k,
        )

    import ray
    import torch

    ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        bench="serve",
        command=(
            "python bench/serve.py "
            f"--concurrency {' '.join(map(str, args.concurrency))} "
            f"--backends {' '.join(args.backends)} --seconds {args.seconds:g} "
            f"--replicas {args.replicas} --max-batch-size {args.max_batch_size} "
            f"--batch-wait-ms {args.batch_wait_ms:g} "
            f"--chunk-sizes {' '.join(map(str, args.chunk_sizes))} "
            f"--batch-route {' '.join(args.batch_route)} --out {args.out}"
            + (f" --name {args.name}" if args.name != "serve" else "")
        ),
        serve_env={k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
        # other work on the machine during the run (1-minute load average before and after)
        loadavg_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        versions={"ray": ray.__version__, "torch": torch.__version__, **_versions()},
        model="langreach-ppo policy config, random init (timing does not depend on weights)",
        direct=direct,
        serve=served,
    )
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))

    print(f"\n{'runtime':<32} {'batch':>5} {'ms/call':>9} {'actions/s':>10} {'vs eager':>8}")
    for r in direct:
        print(
            f"{r['runtime']:<32} {r['batch']:>5} {r['ms_per_call']:>9.3f} "
            f"{r['actions_per_s']:>10.1f} {r['speedup_vs_torch_eager']:>7.2f}x"
        )
    print(
        f"\n{'backend':<7} {'route':<13} {'rows':>4} {'K':>3} {'conc':>5} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'req/s':>8} {'actions/s':>10}"
    )
    for r in served:
        print(
            f"{r['backend']:<7} {r['route']:<13} {r['rows_per_request']:>4} {r['chunk_size']:>3} "
            f"{r['concurrency']:>5} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['requests_per_s']:>8.1f} {r['actions_per_s']:>10.1f}"
        )
    print(f"\nwrote {out / f'{args.name}.json'}")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("onnxruntime", "onnx", "openvino"):
        with contextlib.suppress(ImportError):
            out[name] = __import__(name).__version__
    return out


if __name__ == "__main__":
    main()
