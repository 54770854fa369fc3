"""``python -m kubetune_api [--check] [--root DIR]``: write (or check) the files generated from the models.

``make crds`` runs it (the CRD into crds/, docs/api.md), then hack/sync-chart-crds.sh, which
copies crds/ into the chart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .generated import generated_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_api", description=__doc__)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming stale files")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    args = parser.parse_args(argv)
    stale = []
    for relative, text in generated_files().items():
        path = args.root / relative
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(relative)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"kubetune_api: wrote {relative}")
    if args.check and stale:
        for relative in stale:
            print(f"kubetune_api: {relative} differs from what the models generate", file=sys.stderr)
        print("kubetune_api: run `make crds`", file=sys.stderr)
        return 1
    if not stale:
        print("kubetune_api: generated files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
