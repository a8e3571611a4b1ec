"""The ``deepserve`` command line.

``deepserve build`` trains and exports models into a model repository (needs the
``train`` extra); ``deepserve models`` lists what a repository holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deepserve.errors import DeepServeError
from deepserve.repository import ModelRepository, default_root

# Model name -> the family that builds it. One family may build several models.
BUILDABLE = {
    "fraud-autoencoder": "fraud",
    "digit-classifier": "digits",
    "digit-classifier-robust": "digits",
}


def _build(args: argparse.Namespace) -> int:
    names = args.only or list(BUILDABLE)
    unknown = [n for n in names if n not in BUILDABLE]
    if unknown:
        print(f"deepserve build: unknown model(s) {unknown}; choose from {list(BUILDABLE)}", file=sys.stderr)
        return 2
    if args.data is not None and names != ["fraud-autoencoder"]:
        print("deepserve build: --data trains the anomaly detector; use it with --only fraud-autoencoder",
              file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_file():
        print(f"deepserve build: --data {args.data}: no such file", file=sys.stderr)
        return 2
    repo = args.repo
    repo.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    written: list[Path] = []

    if "fraud-autoencoder" in names:
        from deepserve.models import fraud

        options = fraud.FraudBuildOptions(
            name=args.name or "fraud-autoencoder", data=args.data,
            label_column=args.label_column, fpr=args.fpr,
        )
        try:
            written.append(fraud.build(repo, args.seed, options))
        except ValueError as exc:  # a bad --data table
            print(f"deepserve build: {exc}", file=sys.stderr)
            return 2
    digit_names = [n for n in names if BUILDABLE[n] == "digits"]
    if digit_names:
        from deepserve.models import digits

        written += digits.build(repo, args.seed, digit_names)

    for directory in written:
        manifest = ModelRepository(repo).get(directory.parent.name, directory.name).manifest
        shown = {k: v for k, v in manifest.metrics.items() if isinstance(v, float)}
        figures = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        print(f"built {manifest.name} v{manifest.version} -> {directory}\n    {figures}")
    print(f"deepserve build: {len(written)} model(s) in {time.perf_counter() - started:.1f} s")
    return 0


def _models(args: argparse.Namespace) -> int:
    repo = ModelRepository(args.repo)
    names = repo.model_names()
    if not names:
        print(f"no models in {repo.root} (run `deepserve build`)")
        return 1
    for name in names:
        for version in repo.versions(name):
            model = repo.get(name, version)
            try:
                model.read_model_bytes()
                state = "ok"
            except DeepServeError as exc:
                state = f"REFUSED: {exc}"
            print(f"{name:26s} v{version:4s} {model.manifest.kind:11s} {state}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepserve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train, export and verify models into a model repository")
    b.add_argument("--only", action="append", metavar="NAME",
                   help=f"build only this model (repeatable): {', '.join(BUILDABLE)}")
    b.add_argument("--data", type=Path, help="CSV to train the anomaly detector on (bring your own data)")
    b.add_argument("--label-column", help="label column in --data, used for evaluation only")
    b.add_argument("--name", help="model name for a --data build (default fraud-autoencoder)")
    b.add_argument("--fpr", type=float, default=0.01, help="false-positive rate the threshold is calibrated to")
    b.add_argument("--repo", type=Path, default=default_root(), help="model repository directory")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_build)

    m = sub.add_parser("models", help="list the models in a repository and verify their files")
    m.add_argument("--repo", type=Path, default=default_root())
    m.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
