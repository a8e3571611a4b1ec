"""Peak memory and time of `deepserve build --data` on a large transaction table.

For each row count, writes a CSV in the repository's transaction schema (``Time``,
``V1``..``V28``, ``Amount``, ``Class``: 31 columns) with the fraud model's own seeded
generator, one million rows at a time, then runs

    deepserve build --only fraud-autoencoder --data <csv> --repo <tmpdir>

as a subprocess and records its peak resident memory: the kernel's high-water mark of the
build process (``ru_maxrss`` from wait4), and the largest sum over its process tree seen by
polling every 50 ms; the larger is reported. The target is the issue's: peak memory at
most 3x the table's float32 size (rows x 31 x 4 bytes) + 1 GB.

    make bench-build                        # 1,000,000 and 10,000,000 rows
    python loadtests/bench/build_memory.py --rows 1000000 --keep

MB and GB are decimal (10^6, 10^9 bytes). The CSVs go under --workdir (default /tmp) and
are deleted afterwards unless --keep is given; a kept CSV is reused by the next run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parents[2]
COLUMNS = 31  # Time, V1..V28, Amount, Class
CHUNK_ROWS = 1_000_000
MB = 1e6


def write_table(path: Path, rows: int, seed: int) -> None:
    """``rows`` transactions, generated and written a million at a time (bounded memory).

    Chunk ``i`` is ``generate_transactions(seed + i)`` (the same world, other draws), its
    times shifted past the previous chunk's so the log stays chronological.
    """
    import numpy as np

    from deepserve.models import fraud

    tmp = path.with_suffix(".partial")
    offset = 0.0
    for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
        cfg = fraud.SyntheticConfig(n_rows=min(CHUNK_ROWS, rows - start))
        x, label, _ = fraud.generate_transactions(seed + i, cfg)
        x[:, 0] += offset
        offset = float(np.ceil(x[:, 0].max() / fraud.SECONDS_PER_DAY)) * fraud.SECONDS_PER_DAY
        fraud.write_csv(tmp, x, label, append=i > 0)
        del x, label
    tmp.rename(path)


def tree_rss(proc: psutil.Process) -> int:
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in members:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_build(csv_path: Path, repo: Path, seed: int) -> dict:
    """Run the build; its wall time, exit status, output and peak RSS (bytes)."""
    cmd = [str(PROJECT / ".venv" / "bin" / "deepserve"), "build", "--only", "fraud-autoencoder",
           "--data", str(csv_path), "--repo", str(repo), "--seed", str(seed)]
    if not Path(cmd[0]).exists():
        cmd[0:1] = [sys.executable, "-m", "deepserve.cli"]
    out = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    watched = psutil.Process(proc.pid)
    sampled = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sampled = max(sampled, tree_rss(watched))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    out.seek(0)
    text = out.read().decode(errors="replace")
    maxrss = usage.ru_maxrss * 1024  # kilobytes on Linux
    return {"rc": proc.returncode, "seconds": seconds, "peak": max(maxrss, sampled),
            "maxrss": maxrss, "sampled": sampled, "output": text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the generated CSVs")
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          "MB = 10^6 bytes; float32 size = rows x 31 x 4 bytes")
    header = (f"{'rows':>11} {'CSV MB':>8} {'float32 MB':>10} {'build s':>8} {'peak RSS MB':>11} "
              f"{'peak/f32':>8} {'<= 3x f32 + 1 GB':>16}")
    results = []
    for rows in args.rows:
        csv_path = args.workdir / f"deepserve-build-memory-{rows}-seed{args.seed}.csv"
        if not csv_path.exists():
            t = time.perf_counter()
            write_table(csv_path, rows, args.seed)
            print(f"wrote {csv_path} in {time.perf_counter() - t:.0f} s", flush=True)
        csv_bytes = csv_path.stat().st_size
        repo = Path(tempfile.mkdtemp(prefix="deepserve-build-memory-", dir=args.workdir))
        try:
            r = run_build(csv_path, repo, args.seed)
        finally:
            shutil.rmtree(repo, ignore_errors=True)
            if not args.keep:
                csv_path.unlink(missing_ok=True)
        if r["rc"] != 0:
            print(f"build failed (exit {r['rc']}):\n{r['output'][-3000:]}", file=sys.stderr)
            return 1
        f32 = rows * COLUMNS * 4
        line = (f"{rows:>11,} {csv_bytes / MB:>8,.0f} {f32 / MB:>10,.0f} "
                f"{r['seconds']:>8.1f} {r['peak'] / MB:>11,.0f} {r['peak'] / f32:>8.2f} "
                f"{'yes' if r['peak'] <= 3 * f32 + 1e9 else 'no':>16}")
        figures = re.findall(r"^\s+(roc_auc=.*)$", r["output"], re.M)
        print(f"  build's own figures: {figures[0] if figures else '(none)'}; "
              f"peak = max(wait4 ru_maxrss {r['maxrss'] / MB:,.0f} MB, "
              f"sampled tree {r['sampled'] / MB:,.0f} MB)", flush=True)
        results.append(line)
        print(header)
        print("\n".join(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
