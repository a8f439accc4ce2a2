"""Regenerates the gRPC stubs in modelfleet/v1 from proto/ (`make proto`).

Generated code is committed so that running modelfleet needs no protoc; a test
regenerates into a temporary directory and fails when the two drift apart.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every .proto under proto/ into out_dir; returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(p for p in out_dir.rglob("*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        if path.is_relative_to(REPO_ROOT / "modelfleet" / "v1"):
            print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
