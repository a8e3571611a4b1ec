"""Real networks for the recommender's evaluation, from Debian's ``python3-graph-tool``.

The synthetic generator (:func:`~deepserve.models.graph.data.synthetic_graph`) is the
project's own, so a figure on it says as much about the generator as about the model. These
are published networks that graph-tool ships in its ``collection`` folder (in the public
domain, per the package's copyright file), fetched through Debian's package registry, the
only outside source a build may use: nothing is downloaded at run time, and nothing is
committed. ``make graph-collection`` runs :func:`fetch`; ``deepserve build --edges`` reads
the files as they are (:func:`~deepserve.models.graph.data.load_edge_list` reads graph-tool's
binary format).

Only the edges are used: the files' vertex positions are a layout drawn from every edge,
held-out ones included, and would leak them as features.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deepserve.models.graph.data import sha256_of

PACKAGE = "python3-graph-tool"
INSIDE = "usr/lib/python3/dist-packages/graph_tool/collection"


@dataclass(frozen=True)
class RealGraph:
    name: str
    sha256: str  # of the .gt.gz file as Debian ships it (2.45+ds-10)
    description: str


GRAPHS = {g.name: g for g in (
    RealGraph("hep-th", "d0003c1e840cba5398c50a9c8ed3857dec74eb1c1e5427ffa85ece329e13f030",
              "co-authorships among arXiv hep-th authors, 1995-1999 (M. E. J. Newman, PNAS 98, 404, 2001)"),
    RealGraph("cond-mat", "7624bd9dc297a740b4ced4520f280a894785a6427d2fcd83329c1a3b0c86622b",
              "co-authorships among arXiv cond-mat authors, 1995-1999 (Newman, PNAS 98, 404, 2001)"),
    RealGraph("email-Enron", "f7d5902ae811aedacbda9eaedbd6791bd11145a3e56c35ad0ed31daa03fade2f",
              "who e-mailed whom at Enron (SNAP email-Enron; Klimt and Yang, 2004; Leskovec et al., 2009)"),
)}


def default_directory() -> Path:
    """Where the files live: ``DEEPSERVE_GRAPH_COLLECTION``, else ``.data/graph-collection`` in
    the project (the Makefile's ``GRAPHS_DIR``)."""
    env = os.environ.get("DEEPSERVE_GRAPH_COLLECTION")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".data" / "graph-collection"


def path_of(name: str, directory: Path | None = None) -> Path:
    """The verified file of a collection graph.

    Raises:
        ValueError: an unknown name, or a file that is missing or differs from Debian's.
    """
    if name not in GRAPHS:
        raise ValueError(f"unknown collection graph {name!r}; choose from {sorted(GRAPHS)}")
    path = (directory or default_directory()) / f"{name}.gt.gz"
    if not path.is_file():
        raise ValueError(f"{path} is missing: run `make graph-collection` (fetches Debian's {PACKAGE})")
    if sha256_of(path) != GRAPHS[name].sha256:
        raise ValueError(f"{path}: sha256 differs from the file Debian ships; delete it and run "
                         "`make graph-collection`")
    return path


def _download(into: Path) -> Path:
    """Debian's package file, by ``apt-get download`` (with ``apt-get update`` first when the
    package lists lack it and we are root)."""
    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", "-q", PACKAGE], cwd=into, capture_output=True, text=True)

    done = download()
    if done.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        done = download()
    if done.returncode != 0:
        raise RuntimeError(f"apt-get download {PACKAGE} failed ({done.stderr.strip()[-300:]}); "
                           "as root, run apt-get update first")
    return next(into.glob("*.deb"))


def fetch(directory: Path, names: list[str]) -> None:
    """Put the named graphs' files in ``directory``, verified; those already there are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = [n for n in names if not (directory / f"{n}.gt.gz").is_file()]
    if wanted:
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            deb = _download(Path(tmp))
            # dpkg-deb gives the package's data as a tar stream; only the named files are kept.
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as unpack:
                with tarfile.open(fileobj=unpack.stdout, mode="r|") as tar:
                    for member in tar:
                        name = Path(member.name).name.removesuffix(".gt.gz")
                        if (member.isfile() and name in wanted
                                and Path(member.name).parent.as_posix().lstrip("./") == INSIDE):
                            with tar.extractfile(member) as src, open(Path(tmp) / f"{name}.gt.gz", "wb") as dst:
                                shutil.copyfileobj(src, dst)
            for name in wanted:
                part = Path(tmp) / f"{name}.gt.gz"
                if not part.is_file():
                    raise RuntimeError(f"{deb.name} has no {INSIDE}/{name}.gt.gz")
                if sha256_of(part) != GRAPHS[name].sha256:
                    raise RuntimeError(f"{name}.gt.gz in {deb.name} differs from the file this project "
                                       "pinned (a new Debian revision?): check it and update GRAPHS")
                os.replace(part, directory / f"{name}.gt.gz")
    for name in names:
        print(f"{path_of(name, directory)}: {GRAPHS[name].description}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"Fetch real networks from Debian's {PACKAGE}.")
    p.add_argument("names", nargs="*", default=list(GRAPHS), help=f"graphs (default all: {', '.join(GRAPHS)})")
    p.add_argument("--into", type=Path, default=default_directory())
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in GRAPHS]
    if unknown:
        p.error(f"unknown graph(s) {unknown}; choose from {sorted(GRAPHS)}")
    try:
        fetch(args.into, args.names)
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"graph collection: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
