"""Generate the Python gRPC code for protos/ into services/api (or check it is current).

python tools/gen_protos.py          # regenerate
python tools/gen_protos.py --check  # exit 1 when the committed code is stale (CI)
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "services" / "api"


def generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for package in {p.parent for p in out.rglob("*_pb2.py")}:
        node = package
        while node != out:
            (node / "__init__.py").touch()
            node = node.parent


def generated_files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"}
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="fail if services/api differs from a fresh generation"
    )
    args = parser.parse_args()
    if not args.check:
        if (OUT / "loupe").exists():
            shutil.rmtree(OUT / "loupe")
        generate(OUT)
        print(f"generated {len(generated_files(OUT / 'loupe'))} files into {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh / "loupe"), generated_files(OUT / "loupe")
        stale = sorted(want ^ have)
        stale += sorted(
            f
            for f in want & have
            if not filecmp.cmp(fresh / "loupe" / f, OUT / "loupe" / f, shallow=False)
        )
        if stale:
            print("generated code is stale; run: python tools/gen_protos.py", file=sys.stderr)
            for f in stale:
                print(f"  services/api/loupe/{f}", file=sys.stderr)
            return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
