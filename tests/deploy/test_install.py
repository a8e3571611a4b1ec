"""`pip install .` (not editable) gives a `deepserve serve` that starts and answers.

What the container image does (Dockerfile): a non-editable install must carry everything
serving needs, the default Serve config (package data of ``deepserve.deploy``) included.

The install is a real one, dependencies and all, into a fresh venv: here they come from a local
package index and cache, and the whole install took 35-75 s on the shared 2-core test machine
(well under the test's limit, so no shortcut through the project venv's packages is taken). It
installs from a copy of the project's source files, so that the build does not write ``build/``
and ``*.egg-info`` into the working tree. The server runs from a directory with no project files,
without ``--config``: it must find the packaged config.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from k8s_objects import PROJECT

READY_LINE = "DeepServe ready in"
# What `pip install .` reads (pyproject.toml's package-dir), nothing else.
SOURCES = ("pyproject.toml", "README.md", "services", "models", "deploy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.timeout(600)
def test_non_editable_install_serves_with_the_packaged_config(repository, tmp_path):
    from deepserve.client import DeepServeClient
    from deepserve.repository import default_root

    source, venv, workdir = tmp_path / "src", tmp_path / "venv", tmp_path / "run"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "k8s")
    for name in SOURCES:
        path = PROJECT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS", "DEEPSERVE_MODEL_REPOSITORY")}
    # A cluster of its own, whatever this session's Ray uses: no token auth to set up.
    env["RAY_AUTH_MODE"] = "disabled"
    python, deepserve = venv / "bin" / "python", venv / "bin" / "deepserve"

    started = time.perf_counter()
    run([sys.executable, "-m", "venv", str(venv)], workdir, env, 120)
    run([str(python), "-m", "pip", "install", "--quiet", str(source)], workdir, env, 480)
    install_s = time.perf_counter() - started

    # The package (and its config) come from the fresh venv's site-packages, not this checkout.
    where = run([str(python), "-c", (
        "import sys, deepserve, deepserve.cli as c; "
        "print(deepserve.__file__); print(c.default_config()); "
        "print(any('__editable__' in type(f).__module__ for f in sys.meta_path))")], workdir, env, 60).split()
    assert Path(where[0]).is_relative_to(venv) and "site-packages" in where[0], where
    assert Path(where[1]).is_relative_to(venv) and Path(where[1]).is_file(), where
    assert where[2] == "False", "the project's editable finder is active in the fresh venv"

    port, metrics_port = free_port(), free_port()
    server = subprocess.Popen(
        [str(deepserve), "serve", "--repo", str(Path(default_root()).resolve()), "--models", "fraud-autoencoder",
         "--port", str(port), "--metrics-port", str(metrics_port)],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: Ray's processes go with it on failure
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(server.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any(READY_LINE in line for line in output):
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                pytest.fail(f"no {READY_LINE!r} within 300 s:\n{''.join(output)[-4000:]}")
            if line is None:
                pytest.fail(f"deepserve serve exited ({server.wait()}):\n{''.join(output)[-4000:]}")
            output.append(line)
        ready_s = time.perf_counter() - started - install_s

        with DeepServeClient(f"127.0.0.1:{port}") as client:
            response = client.score([[0.0] * 29 + [120.0]])
        assert response.model == "fraud-autoencoder"
        (result,) = response.results
        assert math.isfinite(result.score) and result.threshold > 0

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, "".join(output)[-4000:]
        while (line := lines.get(timeout=10)) is not None:
            output.append(line)
        assert "shutting down" in "".join(output)
        print(f"install {install_s:.0f} s, serve ready after {ready_s:.0f} s")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    shutil.rmtree(venv)  # ~0.9 GB; kept on failure for a look
