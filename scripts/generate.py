"""Generate the Python code of the contract into client/conveyor/v1.

Run `python scripts/generate.py` after changing a .proto file; `--check` regenerates
into a scratch folder and fails if the committed code differs, so that it never goes stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("conveyor") / "v1"
TARGET = ROOT / "client" / PACKAGE
INIT = '"""Generated code of the conveyor.v1 contract (protos/conveyor/v1). Do not edit."""\n'


def generate(out_root: Path) -> Path:
    """Run protoc with the Python, gRPC and mypy-protobuf plugins; return the package folder."""
    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *sources,
    ]
    subprocess.run(command, check=True, cwd=PROTOS)
    package = out_root / PACKAGE
    (package / "__init__.py").write_text(INIT)
    return package


def differences(left: Path, right: Path) -> list[str]:
    """Names of the files that differ between two folders, or are in one only."""
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    _, mismatch, errors = filecmp.cmpfiles(left, right, cmp.common_files, shallow=False)
    return sorted(mismatch + errors + cmp.left_only + cmp.right_only)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        if args.check:
            stale = differences(fresh, TARGET) if TARGET.exists() else ["(missing)"]
            if stale:
                print("generated code is stale, run scripts/generate.py:", ", ".join(stale))
                return 1
            return 0
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(fresh, TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
