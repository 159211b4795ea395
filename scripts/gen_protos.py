"""Regenerate the Python stubs in nextword/v1/ (and KServe's descriptor set) from protos/.

    python scripts/gen_protos.py [OUT_DIR]

Runs grpc_tools' protoc in this interpreter (the one the script is run with),
writing into OUT_DIR (default: the repository root, i.e. over the committed
stubs). tests/test_protos.py fails when the committed stubs are out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "nextword/v1/nextword.proto"
KSERVE = "inference/grpc_service.proto"
KSERVE_DESC = "nextword/kserve/grpc_service.desc"


def main(argv: list[str]) -> int:
    out = argv[0] if argv else str(ROOT)
    include = (
        Path(protoc.__file__).parent / "_proto"
    )  # google/protobuf/*.proto, as `python -m grpc_tools.protoc`
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "protos" / PROTO),
    ]
    if protoc.main(args) != 0:
        return 1
    # KServe v2: a descriptor set, loaded by the server into a pool of its own (see the proto).
    (Path(out) / KSERVE_DESC).parent.mkdir(parents=True, exist_ok=True)
    kserve = ["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={Path(out) / KSERVE_DESC}"]
    return int(protoc.main([*kserve, str(ROOT / "protos" / KSERVE)]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
