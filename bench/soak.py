"""Soak benchmark: a live export of a small policy under sustained load, a mix of good and bad
requests, with one replica killed mid-run.

The model is the langreach-ppo preset's policy config (random init), exported to ONNX and served
by ``vla_ray.serve`` with 2 replicas (API key on, shield rate limit, e-stop state shared).
``CONCURRENCY`` closed client loops post to ``/v1/act`` for ``MINUTES``; a fraction
``BAD_FRACTION`` of the requests are bad (not JSON, float32 overflow, wrong state length, deep
nesting, out-of-bounds previous_action, undecodable image, wrong type, missing API key). Halfway
through, one replica actor is killed. Before the load, an e-stop posted once must stop a
session on every replica (20 requests) and a resume must lift it.

Reports per time window: good requests' error rate and p50/p99 latency, bad requests answered
>= 500, requests/s, each replica's resident memory; and the recovery after the kill (the last
good request that failed, and when Serve ran 2 replicas again). Prints a table, writes
``OUT/soak.json`` and ``OUT/soak.png``.

    python bench/soak.py --out docs/bench            # 10 minutes at concurrency 32
    python bench/soak.py --minutes 1 --out /tmp/soak  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("RAY_worker_niceness", "0")

from serve import build_model, observations  # noqa: E402  (bench/serve.py)

KEY = "soak-key"
APP = "soak"
BAD_KINDS = (
    "not_json",
    "overflow_float32",
    "wrong_state_length",
    "deep_nesting",
    "previous_action_out_of_bounds",
    "bad_image",
    "wrong_type",
    "missing_api_key",
)


def bad_bodies(good: dict[str, Any]) -> dict[str, tuple[bytes, bool]]:
    """One body per bad kind: (body, send the API key)."""
    state_len = len(good["state"])

    def with_(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    return {
        "not_json": (b'{"instruction": "go", "image": ', True),
        "overflow_float32": (with_(state=[1e39] * state_len), True),
        "wrong_state_length": (with_(state=[0.0] * (state_len + 3)), True),
        "deep_nesting": (b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b"}", True),
        "previous_action_out_of_bounds": (with_(previous_action=[5.0, -5.0]), True),
        "bad_image": (with_(image="not base64 !!"), True),
        "wrong_type": (with_(instruction=123, state="zero"), True),
        "missing_api_key": (json.dumps(good).encode(), False),
    }


def replica_names() -> list[str]:
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def replica_pids() -> dict[str, int]:
    """Live replica processes of the app: {replica id: pid}."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:{APP}:" in cmd:
            out[str(proc.info["pid"])] = proc.info["pid"]
    return out


def running_replicas() -> int:
    from ray import serve

    try:
        app = serve.status().applications[APP]
        dep = next(iter(app.deployments.values()))
        return int(dep.replica_states.get("RUNNING", 0))
    except Exception:
        return 0


def estop_check(url: str, good: bytes, replicas: int) -> dict[str, Any]:
    """E-stop one session once, then 20 requests of it must all get the stop action (the
    replicas share the state); after a resume, none."""

    def post(path: str, body: bytes | None, session: str) -> tuple[int, dict]:
        req = urllib.request.Request(
            url + path,
            data=body if body is not None else b"",
            headers={"Content-Type": "application/json", "X-API-Key": KEY, "X-Session-Id": session},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())

    status, answer = post("/v1/estop", None, "soak-check")
    stopped = [post("/v1/act", good, "soak-check")[1]["safety"]["stopped_by"] for _ in range(20)]
    post("/v1/resume", None, "soak-check")
    after = [post("/v1/act", good, "soak-check")[1]["safety"]["stopped_by"] for _ in range(10)]
    return {
        "estop_answer": answer,
        "stopped_answers": sum(s == "estop" for s in stopped),
        "of": len(stopped),
        "stopped_after_resume": sum(s is not None for s in after),
        "replicas": replicas,
    }


async def load(
    url: str,
    goods: list[bytes],
    bads: dict[str, tuple[bytes, bool]],
    concurrency: int,
    seconds: float,
    bad_fraction: float,
    log: list[tuple[float, float, str, int | str]],
) -> None:
    """Closed loops for ``seconds``; ``log`` gets (sent, latency s, kind, status or error)."""
    import aiohttp

    rng = np.random.default_rng(0)
    kinds = list(bads)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def loop(worker: int, t_end: float) -> None:
            i = worker
            while time.perf_counter() < t_end:
                if rng.random() < bad_fraction:
                    kind = kinds[int(rng.integers(len(kinds)))]
                    body, keyed = bads[kind]
                else:
                    kind, body, keyed = "good", goods[i % len(goods)], True
                headers = {"Content-Type": "application/json"}
                if keyed:
                    headers["X-API-Key"] = KEY
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status: int | str = resp.status
                except Exception as err:  # a dropped connection (the killed replica)
                    status = type(err).__name__
                log.append((t0, time.perf_counter() - t0, kind, status))
                i += concurrency

        t_end = time.perf_counter() + seconds
        await asyncio.gather(*(loop(w, t_end) for w in range(concurrency)))


def windows(
    log: list[tuple[float, float, str, int | str]],
    memory: list[tuple[float, dict[str, float]]],
    t0: float,
    seconds: float,
    width: float,
) -> list[dict[str, Any]]:
    """Per ``width``-second window: good error rate, p50/p99, bad >= 500, req/s, memory."""
    rows = []
    for start in np.arange(0.0, seconds, width):
        lo, hi = t0 + start, t0 + min(start + width, seconds)
        sel = [r for r in log if lo <= r[0] < hi]
        good = [r for r in sel if r[2] == "good"]
        ok = [r[1] * 1e3 for r in good if r[3] == 200]
        bad = [r for r in sel if r[2] != "good"]
        bad_5xx = [r for r in bad if not isinstance(r[3], int) or r[3] >= 500]
        mem = [m for t, m in memory if lo <= t < hi]
        rss = {}
        for m in mem:
            for pid, mb in m.items():
                rss[pid] = max(rss.get(pid, 0.0), mb)
        rows.append(
            dict(
                window_s=[round(float(start), 1), round(float(min(start + width, seconds)), 1)],
                requests=len(sel),
                requests_per_s=round(len(sel) / (hi - lo), 1),
                good=len(good),
                good_errors=len(good) - len(ok),
                good_error_rate=round((len(good) - len(ok)) / max(1, len(good)), 5),
                p50_ms=round(float(np.percentile(ok, 50)), 2) if ok else None,
                p99_ms=round(float(np.percentile(ok, 99)), 2) if ok else None,
                bad=len(bad),
                bad_5xx=len(bad_5xx),
                replica_rss_mb={pid: round(mb, 1) for pid, mb in sorted(rss.items())},
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per table row")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import psutil
    import ray
    from ray import serve

    from vla_ray.export import export
    from vla_ray.serve.app import ServeSettings, build_app, shutdown
    from vla_ray.serve.client import act_body, free_port
    from vla_ray.train import init_ray

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="vla-soak-"))
    export(build_model(work / "vla"), "onnx", work / "export", progress=None)
    obs = observations()
    good_bodies = [act_body(o["image"], t, o["state"]) for o, t in obs]
    goods = [json.dumps(b).encode() for b in good_bodies]
    bads = bad_bodies(good_bodies[0])

    init_ray(num_cpus=os.cpu_count())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30.0})
    app = build_app(
        ServeSettings(model=str(work / "export"), api_key=KEY, shield={"max_delta": 0.5}),
        num_replicas=args.replicas,
        replica_cpus=0.5,
        access_log=False,
    )
    serve.run(app, name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    seconds = args.minutes * 60.0
    try:
        estop = estop_check(url, goods[0], args.replicas)
        print(f"e-stop across replicas: {estop}", flush=True)

        memory: list[tuple[float, dict[str, float]]] = []
        events: dict[str, Any] = {}
        stop = threading.Event()
        t0 = time.perf_counter()

        def monitor() -> None:
            killed = False
            while not stop.is_set():
                now = time.perf_counter()
                rss = {}
                for rid, pid in replica_pids().items():
                    with contextlib.suppress(psutil.Error):
                        rss[rid] = psutil.Process(pid).memory_info().rss / 2**20
                memory.append((now, rss))
                if not killed and now - t0 >= seconds / 2:
                    victim = replica_names()[0]
                    events["killed_replica"] = victim
                    events["kill_at_s"] = round(now - t0, 2)
                    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                    killed = True
                    kill_t = time.perf_counter()
                    # wait for Serve to notice and run the replacement
                    while time.perf_counter() - kill_t < 5 and running_replicas() >= args.replicas:
                        time.sleep(0.1)
                    while not stop.is_set() and running_replicas() < args.replicas:
                        time.sleep(0.25)
                    events["replicas_back_after_s"] = round(time.perf_counter() - kill_t, 2)
                    continue
                stop.wait(5.0)

        thread = threading.Thread(target=monitor, daemon=True)
        thread.start()
        log: list[tuple[float, float, str, int | str]] = []
        asyncio.run(
            load(url + "/v1/act", goods, bads, args.concurrency, seconds, args.bad_fraction, log)
        )
        stop.set()
        thread.join()
        with urllib.request.urlopen(url + "/v1/health", timeout=30) as resp:
            health = json.loads(resp.read())
    finally:
        shutdown()
        ray.shutdown()

    kill_t = t0 + events.get("kill_at_s", seconds)
    failed_good_after = [r for r in log if r[2] == "good" and r[3] != 200 and r[0] >= kill_t - 1]
    last_fail = max((r[0] + r[1] for r in failed_good_after), default=None)
    events["good_failures_around_kill"] = len(failed_good_after)
    events["good_failure_statuses"] = sorted(
        {str(r[3]) for r in log if r[2] == "good" and r[3] != 200}
    )
    # bad requests answered >= 500 (or dropped) away from the kill (+-15 s): none expected
    events["bad_5xx_away_from_kill"] = sum(
        1
        for r in log
        if r[2] != "good" and (not isinstance(r[3], int) or r[3] >= 500) and abs(r[0] - kill_t) > 15
    )
    events["last_good_failure_after_kill_s"] = (
        None if last_fail is None else round(last_fail - kill_t, 2)
    )
    rows = windows(log, memory, t0, seconds, args.window)
    good = [r for r in log if r[2] == "good"]
    good_ok = [r[1] * 1e3 for r in good if r[3] == 200]
    bad = [r for r in log if r[2] != "good"]
    by_kind: dict[str, dict[str, int]] = {}
    for r in bad:
        by_kind.setdefault(r[2], {}).setdefault(str(r[3]), 0)
        by_kind[r[2]][str(r[3])] += 1
    # memory growth: each replica that lived through the whole run, first vs last minute
    first = [m for t, m in memory if t0 + 30 <= t < t0 + 90]
    last = [m for t, m in memory if t >= t0 + seconds - 60]
    growth = {}
    for rid in set().union(*first) if first else set():
        a = [m[rid] for m in first if rid in m]
        b = [m[rid] for m in last if rid in m]
        if a and b:
            growth[rid] = {"first_mb": round(max(a), 1), "last_mb": round(max(b), 1)}
    summary = dict(
        requests=len(log),
        good=len(good),
        good_errors=len(good) - len(good_ok),
        good_error_rate=round((len(good) - len(good_ok)) / max(1, len(good)), 6),
        good_p50_ms=round(float(np.percentile(good_ok, 50)), 2),
        good_p99_ms=round(float(np.percentile(good_ok, 99)), 2),
        bad=len(bad),
        bad_5xx=sum(1 for r in bad if not isinstance(r[3], int) or r[3] >= 500),
        requests_per_s=round(len(log) / seconds, 1),
    )
    import torch

    record = dict(
        bench="soak",
        command=(
            f"python bench/soak.py --minutes {args.minutes:g} --concurrency {args.concurrency} "
            f"--replicas {args.replicas} --bad-fraction {args.bad_fraction:g} --out {args.out}"
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        loadavg_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        versions={"ray": ray.__version__, "torch": torch.__version__},
        model="langreach-ppo policy config, random init, ONNX backend",
        settings=dict(replicas=args.replicas, replica_cpus=0.5, shield={"max_delta": 0.5}),
        estop_check=estop,
        summary=summary,
        kill=events,
        replica_memory_growth=growth,
        bad_by_kind=by_kind,
        health_after=health,
        windows=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(record, indent=2))
    print(
        f"\n{'window s':>11} {'req/s':>7} {'good':>6} {'err':>4} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'bad':>5} {'bad5xx':>6}  replica RSS MB"
    )
    for r in rows:
        w = f"{r['window_s'][0]:.0f}-{r['window_s'][1]:.0f}"
        rss = " ".join(f"{v:.0f}" for v in r["replica_rss_mb"].values())
        print(
            f"{w:>11} {r['requests_per_s']:>7.1f} {r['good']:>6} {r['good_errors']:>4} "
            f"{r['p50_ms'] or float('nan'):>7.2f} {r['p99_ms'] or float('nan'):>7.2f} "
            f"{r['bad']:>5} {r['bad_5xx']:>6}  {rss}"
        )
    print(f"\nsummary: {summary}\nkill: {events}\nmemory: {growth}\nbad: {by_kind}")
    _plot(rows, events, out / "soak.png")
    print(f"wrote {out / 'soak.json'}")


def _plot(rows: list[dict[str, Any]], events: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    mid = [(r["window_s"][0] + r["window_s"][1]) / 2 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(mid, [r["p50_ms"] for r in rows], label="good p50 ms")
    ax1.plot(mid, [r["p99_ms"] for r in rows], label="good p99 ms")
    ax1.set_ylabel("latency (ms)")
    ax1.legend()
    pids = sorted({p for r in rows for p in r["replica_rss_mb"]})
    for pid in pids:
        ax2.plot(mid, [r["replica_rss_mb"].get(pid) for r in rows], label=f"replica pid {pid}")
    ax2.set_ylabel("replica RSS (MB)")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize=7)
    if "kill_at_s" in events:
        for ax in (ax1, ax2):
            ax.axvline(events["kill_at_s"], color="red", linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
