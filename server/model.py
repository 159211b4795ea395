"""One model version as the server runs it: a bundle, its onnxruntime session, state rows,
batcher and ranker (server/repository.py loads them; each session runs on one to its end)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nextword.bundle import Bundle
from nextword.ranking import Ranker
from nextword.runtime import OnnxLM

from .batcher import Batcher
from .state import StatePool
from .stats import ModelStats

Signature = tuple[tuple[str, int, int], ...]  # a folder's files: (path, size, mtime in ns)


@dataclass(eq=False)
class ModelVersion:
    """One loaded bundle and everything that runs it."""

    name: str
    version: str
    bundle: Bundle
    lm: OnnxLM
    pool: StatePool
    batcher: Batcher
    ranker: Ranker
    manifest_json: str  # as GetModelInfo shows it
    signature: Signature  # the files it was loaded from
    # The sessions on this version now (server/session.py's records; held by identity).
    sessions: set[object] = field(default_factory=set)
    retired: bool = False  # takes no new sessions; closed once it has no sessions
    closed: bool = False

    @property
    def fingerprint(self) -> str:
        return self.bundle.manifest.fingerprint

    @property
    def stats(self) -> ModelStats:
        return self.batcher.stats

    @property
    def provider(self) -> str:
        return self.lm.provider

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version
