"""Side-by-side benchmark: in-process ONNX Runtime, bare grpcio servers, KServe, DeepServe.

Same machine, same ONNX files, same protocol (Open Inference Protocol ``ModelInfer`` over
gRPC, raw tensors), one load generator for every server. Every server is up at once and the
load alternates between them in short slices (``--rounds`` rounds of ``--slice`` seconds per
cell): on a shared machine whose speed drifts by tens of percent within an hour, drift then
hits every server alike, and their ratios hold. The load generator is closed-loop:
``concurrency`` coroutines, spread over one or two processes (up to four connections each),
each sending pre-serialized requests back to back through grpc.aio with no protobuf work of
its own.

    make bench                      # or: python loadtests/bench/bench.py --repo model-repository

Then digit-classifier's batching, on and off, as an interleaved pair of its own, run three
times (the gain used to wander between runs), and the metrics' cost, on and off, likewise.
Prints a table and the target ratios; writes reports/bench.json and reports/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[2]
METHOD = "/inference.GRPCInferenceService/ModelInfer"
KSERVE_PYTHON = PROJECT / ".venv-kserve" / "bin" / "python"
CONNECTIONS = 4  # per load process (two processes from concurrency 4): at most 8 in all


# ---------------------------------------------------------------------------- load generator


def _load_process(target: str, payload: bytes, concurrency: int, warmup: float, duration: float, out) -> None:
    import asyncio

    import grpc

    async def run():
        # Several connections, as several client instances would open: one HTTP/2 connection
        # serializes on its own I/O, and a server with several processes on one port (DeepServe's
        # gateway workers) spreads connections, not calls. A local subchannel pool per channel:
        # channels to one target otherwise share one connection.
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(min(concurrency, CONNECTIONS))]
        calls = [c.unary_unary(METHOD) for c in channels]  # bytes in, bytes out: no client-side protobuf
        latencies: list[float] = []
        errors: dict[str, int] = {}
        completed = 0  # answered OK, warm-up included (for CPU per request)
        cpu_started = time.process_time()
        start = time.perf_counter()
        measure_from, end = start + warmup, start + warmup + duration

        async def loop(i: int) -> None:
            nonlocal completed
            call = calls[i % len(calls)]
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                completed += 1
                if t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        for c in channels:
            await c.close()
        out.put((latencies, errors, completed, time.process_time() - cpu_started))

    asyncio.run(run())


@dataclass
class Result:
    workload: str
    path: str
    concurrency: int
    rows_per_request: int
    requests_per_s: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict = field(default_factory=dict)
    server_cpu_us: float = float("nan")  # the server's process tree, CPU time per answered request
    client_cpu_us: float = float("nan")  # the load generator's, likewise


def drive(target: str, payload: bytes, concurrency: int, duration: float, warmup: float = 1.5,
          processes: int | None = None, totals: dict | None = None) -> tuple[np.ndarray, dict]:
    """Closed-loop load: returns per-request latencies (s) measured after warm-up, and error
    counts. ``totals``, when given, gets ``completed`` (OK answers, warm-up included) and
    ``client_cpu_s`` (the load processes' CPU time) added to it."""
    processes = processes or (1 if concurrency < 4 else 2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    procs = [ctx.Process(target=_load_process, args=(target, payload, s, warmup, duration, out))
             for s in shares if s]
    for p in procs:
        p.start()
    latencies, errors = [], {}
    for _ in procs:
        lat, err, completed, cpu_s = out.get(timeout=duration + warmup + 120)
        if totals is not None:
            totals["completed"] = totals.get("completed", 0) + completed
            totals["client_cpu_s"] = totals.get("client_cpu_s", 0.0) + cpu_s
        latencies += lat
        for k, v in err.items():
            errors[k] = errors.get(k, 0) + v
    for p in procs:
        p.join()
    return np.array(latencies), errors


def summarize(workload, path, concurrency, rows, latencies, errors, duration) -> Result:
    n = len(latencies)
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000).tolist() if n else (float("nan"),) * 2
    return Result(workload, path, concurrency, rows, n / duration, n * rows / duration, p50, p99, errors)


# ---------------------------------------------------------------------------- payloads


def fraud_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 30)).astype(np.float32)
    x[:, 0] = rng.uniform(0, 172_800, n)  # Time: seconds over two days
    x[:, 29] = rng.lognormal(3.0, 1.0, n)  # Amount
    return x


def digit_images(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:n] / 16.0).astype(np.float32)[:, None]


def infer_request(model: str, input_name: str, array: np.ndarray, outputs: tuple[str, ...] = ()) -> bytes:
    """A serialized ``ModelInferRequest``; ``outputs``: ask for these outputs only (default: all)."""
    from deepserve.proto import inference_pb2 as oip

    request = oip.ModelInferRequest(model_name=model)
    for name in outputs:
        request.outputs.add(name=name)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request.SerializeToString()


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(target: str, timeout: float, proc: subprocess.Popen) -> float:
    import grpc

    from deepserve.proto import inference_pb2 as oip
    from deepserve.proto import inference_pb2_grpc as oip_grpc

    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
            try:
                if stub.ServerReady(oip.ServerReadyRequest(), timeout=1).ready:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} not ready after {timeout:.0f} s")


def _tree(root_pid: int) -> list[int]:
    """A process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_cpu_s(root_pid: int) -> float:
    """CPU time (user + system) of a process and all its living descendants."""
    ticks = 0
    for pid in _tree(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_pss_mb(root_pid: int) -> float:
    """Proportional set size of a process and all its descendants (shared pages split fairly)."""
    total_kb = 0
    for pid in _tree(root_pid):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


class Server:
    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None):
        self.name, self.argv, self.port = name, argv, port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{self.name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.argv, cwd=PROJECT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.ready_s = wait_ready(self.target, 180, self.proc)
        except Exception:
            self.__exit__()
            self.log.seek(0)
            sys.stderr.write(self.log.read()[-3000:])
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def deepserve_config(tmp: Path, batching_enabled: bool = True, processes: int = 0) -> Path:
    """The shipped Serve config, with digit-classifier's batching on or off and the gateway's
    worker processes (0: one per core)."""
    import yaml

    config = yaml.safe_load((PROJECT / "deploy" / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["models"]["digit-classifier"]["batching"]["enabled"] = batching_enabled
    app["args"]["gateway_processes"] = processes
    path = tmp / f"serve_config_batching_{batching_enabled}_processes_{processes}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------- interleaved runs


def interleaved(servers: dict[str, "Server"], cells: list[tuple[str, bytes, int, int]], rounds: int,
                slice_s: float) -> list[Result]:
    """Each cell ``(workload, payload, rows per request, concurrency)`` on every server, all up
    at once, the load alternating between them in ``slice_s`` slices for ``rounds`` rounds:
    drift on a shared machine hits them alike, so their ratios hold."""
    results = []
    for workload, payload, rows, c in cells:
        latencies = {name: [] for name in servers}
        errors: dict[str, dict] = {name: {} for name in servers}
        totals = {name: {"server_cpu_s": 0.0} for name in servers}
        for _ in range(rounds):
            for name, s in servers.items():
                cpu_before = tree_cpu_s(s.proc.pid)
                lat, err = drive(s.target, payload, c, slice_s, warmup=0.5, totals=totals[name])
                totals[name]["server_cpu_s"] += tree_cpu_s(s.proc.pid) - cpu_before
                latencies[name].append(lat)
                for k, v in err.items():
                    errors[name][k] = errors[name].get(k, 0) + v
        for name in servers:
            r = summarize(workload, name, c, rows, np.concatenate(latencies[name]), errors[name], rounds * slice_s)
            done = max(totals[name].get("completed", 0), 1)
            r.server_cpu_us = totals[name]["server_cpu_s"] / done * 1e6
            r.client_cpu_us = totals[name].get("client_cpu_s", 0.0) / done * 1e6
            results.append(r)
            print(f"  {workload:10s} {name:24s} c={c:<3d} {r.requests_per_s:9.0f} req/s {r.rows_per_s:11.0f} rows/s"
                  f"  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  CPU/request server {r.server_cpu_us:4.0f} µs"
                  f" client {r.client_cpu_us:4.0f} µs  {r.errors or ''}", flush=True)
    return results


@contextlib.contextmanager
def running(servers: dict[str, "Server"]):
    """Every server up (each ready) for the block, then stopped."""
    with contextlib.ExitStack() as stack:
        for s in servers.values():
            stack.enter_context(s)
        yield servers


def deepserve_server(repo: Path, tmp: Path, name: str = "deepserve", metrics: bool = True, processes: int = 0,
                     batching: bool = True) -> "Server":
    port = free_port()
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repo", str(repo), "--port", str(port),
           "--metrics-port", str(free_port()), "--config", str(deepserve_config(tmp, batching, processes)),
           "--models", "fraud-autoencoder", "digit-classifier"]
    return Server(name, cmd, port, {"DEEPSERVE_METRICS": "1" if metrics else "0"})


# ---------------------------------------------------------------------------- in-process limit


def in_process(path: Path, input_name: str, array: np.ndarray, seconds: float) -> tuple[float, float]:
    """Calls/s and median latency (ms) of session.run in this process: the ceiling."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {input_name: array}
    for _ in range(200):
        session.run(None, feeds)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return len(times) / sum(times), float(np.median(times) * 1000)


# ---------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=PROJECT / "model-repository")
    p.add_argument("--rounds", type=int, default=4, help="rounds per cell (each server gets one slice a round)")
    p.add_argument("--slice", type=float, default=3.0, help="measured seconds per slice")
    p.add_argument("--batching-runs", type=int, default=3, help="interleaved batching on/off pairs")
    p.add_argument("--out", type=Path, default=PROJECT / "reports" / "bench")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["bare", "kserve", "processes", "batching", "metrics"])
    args = p.parse_args(argv)

    from deepserve.repository import ModelRepository

    repo = ModelRepository(args.repo)
    fraud_path = repo.get("fraud-autoencoder").model_path
    one, many = fraud_rows(1), fraud_rows(256)
    payload = {
        "fraud-1": infer_request("fraud-autoencoder", "transactions", one),
        "fraud-256": infer_request("fraud-autoencoder", "transactions", many),
        # The same rows asking for the score alone: 1 KB back instead of 31 KB (feature_errors).
        "fraud-256 score": infer_request("fraud-autoencoder", "transactions", many, outputs=("score",)),
        "digit-1": infer_request("digit-classifier", "images", digit_images(1)),
    }
    results: list[Result] = []
    extra: dict = {}

    print("in-process ONNX Runtime (the limit)")
    for workload, array in (("fraud-1", one), ("fraud-256", many)):
        calls, p50 = in_process(fraud_path, "transactions", array, 3.0)
        rows = len(array)
        results.append(Result(workload, "in-process ORT", 1, rows, calls, calls * rows, p50, float("nan")))
        print(f"  {workload:10s} {calls:9.0f} calls/s {calls * rows:11.0f} rows/s  p50 {p50 * 1000:7.1f} µs")

    py = sys.executable
    fraud_cells = [("fraud-1", payload["fraud-1"], 1, c) for c in (1, 8, 32)] + \
        [("fraud-256", payload["fraud-256"], 256, 8), ("fraud-256 score", payload["fraud-256 score"], 256, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"DeepServe": deepserve_server(args.repo, Path(tmp))}
        if "processes" not in args.skip:
            servers["DeepServe, 1 process"] = deepserve_server(args.repo, Path(tmp), "deepserve-1", processes=1)
        if "kserve" not in args.skip:
            if KSERVE_PYTHON.exists():
                port = free_port()
                servers["KServe 0.21"] = Server("kserve", [str(KSERVE_PYTHON), "loadtests/bench/kserve_server.py",
                                                           str(fraud_path), "fraud-autoencoder", str(port)], port)
            else:
                print(f"KServe: skipped ({KSERVE_PYTHON} missing; `make bench` installs it)")
        if "bare" not in args.skip:
            # Plain asyncio, and uvloop (the loop DeepServe's gateway workers run on).
            for label, flags in (("bare grpcio", []), ("bare grpcio + uvloop", ["--uvloop"])):
                port = free_port()
                servers[label] = Server("bare", [py, "loadtests/bench/bare_server.py", str(fraud_path),
                                                 "fraud-autoencoder", str(port), *flags], port)
        print(f"fraud scoring, interleaved over {', '.join(servers)}")
        with running(servers):
            extra["cold_start_to_ready_s"] = servers["DeepServe"].ready_s
            extra["stack_pss_mb_after_load"] = tree_pss_mb(servers["DeepServe"].proc.pid)
            results += interleaved(servers, fraud_cells, args.rounds, args.slice)

        if "batching" not in args.skip:
            print("digit-classifier, batching on and off, interleaved")
            pair = {"batching": deepserve_server(args.repo, Path(tmp), "batching-on"),
                    "no batching": deepserve_server(args.repo, Path(tmp), "batching-off", batching=False)}
            with running(pair):
                for run in range(1, args.batching_runs + 1):
                    on, off = interleaved(pair, [("digit-1", payload["digit-1"], 1, 64)], args.rounds, args.slice)
                    extra[f"digit-1 c64 run {run}: batching / no batching"] = on.requests_per_s / off.requests_per_s
                    results += [_renamed(on, f"DeepServe (run {run})"),
                                _renamed(off, f"DeepServe, no batching (run {run})")]

        if "metrics" not in args.skip:
            print("DeepServe with metrics on and off, interleaved")
            pair = {"metrics on": deepserve_server(args.repo, Path(tmp), "metrics-on"),
                    "metrics off": deepserve_server(args.repo, Path(tmp), "metrics-off", metrics=False)}
            with running(pair):
                for r in interleaved(pair, [("fraud-1", payload["fraud-1"], 1, c) for c in (8, 32)],
                                     args.rounds, args.slice):
                    extra[f"{r.path} c{r.concurrency} req/s"] = r.requests_per_s

    report = ratios(results, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "rounds": args.rounds, "slice_s": args.slice, "results": [asdict(r) for r in results],
         "extra": extra, "ratios": report}, indent=2, default=float))
    md = markdown(results, extra, report, machine, args.rounds, args.slice)
    args.out.with_suffix(".md").write_text(md)
    print("\n" + md)
    return 0


def _renamed(result: Result, path: str) -> Result:
    return Result(**{**asdict(result), "path": path})


def _find(results, workload, path, concurrency):
    return next((r for r in results if r.workload == workload and r.path == path and r.concurrency == concurrency),
                None)


def ratios(results: list[Result], extra: dict) -> dict:
    out: dict[str, float] = {}

    def ratio(key, a, b, attr="requests_per_s"):
        if a and b and getattr(b, attr):
            out[key] = getattr(a, attr) / getattr(b, attr)

    for c in (1, 8, 32):
        ds = _find(results, "fraud-1", "DeepServe", c)
        for peer in ("KServe 0.21", "bare grpcio", "bare grpcio + uvloop", "DeepServe, 1 process"):
            ratio(f"fraud-1 c{c}: DeepServe / {peer}", ds, _find(results, "fraud-1", peer, c))
    ds8 = _find(results, "fraud-1", "DeepServe", 8)
    if ds8:
        out["fraud-1 c8: DeepServe p99 ms"] = ds8.p99_ms
    ratio("fraud-256 c8: DeepServe rows/s / in-process", _find(results, "fraud-256", "DeepServe", 8),
          _find(results, "fraud-256", "in-process ORT", 1), "rows_per_s")
    ratio("fraud-256 score c8: DeepServe rows/s / in-process", _find(results, "fraud-256 score", "DeepServe", 8),
          _find(results, "fraud-256", "in-process ORT", 1), "rows_per_s")
    ratio("fraud-256 c8: DeepServe rows/s / KServe", _find(results, "fraud-256", "DeepServe", 8),
          _find(results, "fraud-256", "KServe 0.21", 8), "rows_per_s")
    out.update({k: v for k, v in extra.items() if "batching / no batching" in k})
    for c in (8, 32):
        on, off = extra.get(f"metrics on c{c} req/s"), extra.get(f"metrics off c{c} req/s")
        if on and off:
            out[f"fraud-1 c{c}: metrics on / off"] = on / off
    return out


def markdown(results, extra, report, machine, rounds, slice_s) -> str:
    lines = [
        f"Machine: {machine}. Interleaved: {rounds} rounds of {slice_s:g} s per server and cell "
        "(0.5 s warm-up each), closed loop. CPU per request: the server's whole process tree (for "
        "DeepServe: Ray's processes too) and the load generator's, over the slices, warm-up included.",
        "",
        "| workload | path | concurrency | req/s | rows/s | p50 ms | p99 ms | server CPU µs/req | client CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.workload} | {r.path} | {r.concurrency} | {r.requests_per_s:,.0f} | {r.rows_per_s:,.0f} | "
                     f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.server_cpu_us:.0f} | {r.client_cpu_us:.0f} | "
                     f"{r.errors or ''} |")
    lines += ["", "| target | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.items()]
    for k, v in extra.items():
        if k not in report:
            lines.append(f"| {k} | {v:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
