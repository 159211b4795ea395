"""The committed stubs in nextword/v1 are generated from protos/ (the source of truth)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gen_protos.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=60)
    for name in ("nextword_pb2.py", "nextword_pb2.pyi", "nextword_pb2_grpc.py"):
        fresh = (tmp_path / "nextword" / "v1" / name).read_text()
        committed = (ROOT / "nextword" / "v1" / name).read_text()
        assert fresh == committed, f"nextword/v1/{name} is stale: run python scripts/gen_protos.py"
    desc = "nextword/kserve/grpc_service.desc"
    assert (tmp_path / desc).read_bytes() == (ROOT / desc).read_bytes(), f"{desc} is stale: run gen_protos.py"
