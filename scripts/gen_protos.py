"""Regenerate the Python gRPC stubs in services/proto/ from protos/.

protos/ is the source of truth; the stubs are checked in. This script runs
``python -m grpc_tools.protoc`` over every ``.proto`` under protos/ and writes
``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` into services/proto/ as flat
modules (``protos/deepserve/v1/deepserve.proto`` -> ``deepserve_pb2.py``), with
the imports between them rewritten to package-relative ones, so that
``from deepserve.proto import deepserve_pb2`` works whatever the proto package.
The descriptors keep the proto's own path (``deepserve/v1/deepserve.proto``).

``inference.proto`` is registered in a private descriptor pool rather than the
default one: ``tritonclient.grpc`` bundles its own ``inference.*`` messages in the
default pool, and with both there one process could not import our stubs and
Triton's client (tests, load tests). Reach that pool as
``inference_pb2.DESCRIPTOR.pool`` (e.g. for gRPC server reflection).

Usage:
    python scripts/gen_protos.py           # regenerate services/proto/
    python scripts/gen_protos.py --check   # exit 1 if services/proto/ is stale

The output is deterministic for a given grpcio-tools version, so ``--check``
(the CI drift check) compares bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "protos"
OUT_DIR = REPO / "services" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Protos whose messages clash with a client library's bundled stubs (see the docstring).
PRIVATE_POOL = ("inference.proto",)
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("

# `from a.b import x_pb2 as alias` and `import x_pb2 as alias`, as protoc writes them.
_FROM_IMPORT = re.compile(r"^from ([\w.]+) import (\w+) as (\w+)$", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^import (\w+) as (\w+)$", re.MULTILINE)


def _is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def find_protos() -> list[str]:
    """Paths of every .proto under protos/, relative to it, sorted."""
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))


def run_protoc(protos: list[str], out: Path) -> None:
    """Run grpc_tools.protoc over ``protos`` (relative to protos/), writing a tree into ``out``."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    # Relative paths from protos/ keep the descriptors' file names stable.
    result = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"protoc failed:\n{result.stderr}")


def flatten(tree: Path, dest: Path) -> list[str]:
    """Move the generated modules of ``tree`` into ``dest`` flat, relativising their imports.

    Returns:
        The flat file names written, sorted.
    """
    files = sorted(p for p in tree.rglob("*") if p.is_file() and _is_generated(p))
    # Dotted module path as protoc imports it -> flat module name.
    modules: dict[str, str] = {}
    for path in files:
        if path.suffix == ".py":
            dotted = ".".join(path.relative_to(tree).with_suffix("").parts)
            modules[dotted] = path.stem
    stems = sorted(modules.values())
    clashes = {s for s in stems if stems.count(s) > 1}
    if clashes:
        sys.exit(f"two protos would flatten to the same module: {sorted(clashes)}; rename one")

    def from_import(m: re.Match[str]) -> str:
        package, name, alias = m.groups()
        flat = modules.get(f"{package}.{name}")
        return f"from . import {flat} as {alias}" if flat else m.group(0)

    def plain_import(m: re.Match[str]) -> str:
        name, alias = m.groups()
        flat = modules.get(name)
        return f"from . import {flat} as {alias}" if flat else m.group(0)

    written = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        text = _FROM_IMPORT.sub(from_import, text)
        text = _PLAIN_IMPORT.sub(plain_import, text)
        source = path.relative_to(tree).as_posix().removesuffix("_pb2.py") + ".proto"
        if path.name.endswith("_pb2.py") and source in PRIVATE_POOL:
            if text.count(_DEFAULT_POOL) != 1:
                sys.exit(f"{path.name}: protoc output changed; cannot move it to a private pool")
            text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
        (dest / path.name).write_bytes(text.encode("utf-8"))
        written.append(path.name)
    return sorted(written)


def generate(dest: Path) -> list[str]:
    """Generate the flat stubs for every proto into ``dest``; returns the file names."""
    protos = find_protos()
    if not protos:
        sys.exit(f"no .proto files under {PROTO_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(protos, Path(tmp))
        return flatten(Path(tmp), dest)


def check() -> int:
    """Compare freshly generated stubs with services/proto/; print what differs."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        present = {p.name for p in OUT_DIR.iterdir() if p.is_file() and _is_generated(p)}
        rel = OUT_DIR.relative_to(REPO).as_posix()
        problems = [f"  changed: {rel}/{n}" for n in sorted(fresh & present)
                    if not filecmp.cmp(Path(tmp) / n, OUT_DIR / n, shallow=False)]
        problems += [f"  missing: {rel}/{n}" for n in sorted(fresh - present)]
        problems += [f"  stale (no .proto): {rel}/{n}" for n in sorted(present - fresh)]
    if problems:
        print(
            f"{rel}/ is out of date with protos/:\n" + "\n".join(problems) + "\n"
            "Run `python scripts/gen_protos.py` (make protos) and commit the result. "
            "If only version headers differ, use the grpcio-tools version of the dev extra.",
            file=sys.stderr,
        )
        return 1
    print(f"{rel}/ is up to date with protos/ ({len(fresh)} files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if services/proto/ differs"
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    written = set(generate(OUT_DIR))
    for stale in sorted(p for p in OUT_DIR.iterdir() if _is_generated(p) and p.name not in written):
        stale.unlink()
        print(f"removed stale {stale.relative_to(REPO)}")
    print(f"wrote {len(written)} files to {OUT_DIR.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
