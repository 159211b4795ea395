"""The models a server serves: one bundle, or every version in a model repository.

``--model-repository DIR`` serves the bundles ``DIR/NAME/VERSION/`` (VERSION a whole number, as
in Triton's repositories). Each loaded version is a ``ModelVersion``: its own onnxruntime
session, state pool, batcher and ranker, so versions never share a call or a state row.

* Versions are loaded off the event loop, checksums verified (``load_bundle``), and warmed
  before they take a request: the newest ``--model-versions`` ready versions of a name take
  new sessions, and a request may name any of them; an empty version means the newest.
* A version that is superseded or unloaded is *retired*: it takes no new session, but the
  sessions that began on it finish on it (a session keeps its version to the end, even
  across a resume), and it is closed once the last of them is gone.
* A version that fails to load (corrupt files, a bad manifest) is refused, logged and
  counted; what already serves goes on serving. It is tried again once its files change.
* ``--model-control poll`` (the default) rescans the repository every ``--repository-poll``
  seconds; ``explicit`` only on SIGHUP and KServe's RepositoryModelLoad/Unload (which poll
  refuses, as Triton does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextword.bundle import MANIFEST, Bundle, BundleError, load_bundle
from nextword.ranking import Ranker
from nextword.runtime import OnnxLM

from .batcher import Batcher
from .config import ServerConfig
from .metrics import Metrics
from .model import ModelVersion, Signature
from .security import public_manifest
from .session import SessionRecord
from .state import StatePool
from .store import Persister

log = logging.getLogger("nextword.server")

SINGLE_VERSION = "1"  # the version of the one bundle --model serves


class ModelNotFound(Exception):
    """No ready version answers a request's model name and version; the message says what does."""


class ModelLoadError(Exception):
    """A model could not be loaded; the message says why and what to change."""


WARM_EVERY_SIZE_UP_TO = 128  # above it, sizes 25% apart: warming all of 1..4096 would take hours


def warm_sizes(max_batch: int) -> list[int]:
    """The batch sizes ``warm_up`` runs: every one up to 128, then one every 25% up to ``max_batch``."""
    sizes = list(range(1, min(max_batch, WARM_EVERY_SIZE_UP_TO) + 1))
    while sizes[-1] < max_batch:
        sizes.append(min(max_batch, sizes[-1] * 5 // 4))
    return sizes


def warm_up(lm: OnnxLM, max_batch: int) -> None:
    """Run the batch sizes the batcher forms once, so no user meets a cold shape.

    onnxruntime sizes its buffers on the first call of each shape; doing that now
    costs a few milliseconds here instead of a slow first reply there. Past 128
    (GPU batch sizes) only sizes 25% apart are run; a size between them pays its
    first call once, in a batch that large.
    """
    for n in warm_sizes(max_batch):
        state = lm.zero_state(n)
        for seq in (1, 2) if n == 1 else (1,):
            lm.step_ranked(np.ones((n, seq), dtype=np.int64), state, whole_distribution=True)
        lm.head_ranked(state, whole_distribution=True)


def signature(folder: Path) -> Signature:
    """What a version folder holds now; a failed version is tried again once this changes."""
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return tuple((str(p.relative_to(folder)), (s := p.stat()).st_size, s.st_mtime_ns) for p in files)
    except OSError:  # the folder went away while we looked
        return ()


@dataclass
class _Refused:
    signature: Signature
    reason: str


@dataclass
class Repository:
    """Every model version this process serves, by name and version; see the module's doc."""

    config: ServerConfig
    metrics: Metrics
    persister: Persister | None
    root: Path | None  # None: the one bundle ``config.model``
    versions: dict[tuple[str, str], ModelVersion] = field(default_factory=dict)
    refused: dict[tuple[str, str], _Refused] = field(default_factory=dict)
    # Names an operator unloaded (RepositoryModelUnload): not loaded again until asked to.
    unloaded: set[str] = field(default_factory=set)
    # Session streams open now, across every model (the servicer sets it): batchers read it.
    open_streams: Callable[[], int] = lambda: 1
    _scanning: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ---- what requests see -------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted({v.name for v in self._serving()})

    def ready(self, name: str) -> list[ModelVersion]:
        """The versions of ``name`` that take new sessions, newest first."""
        found = [v for v in self._serving() if v.name == name]
        return sorted(found, key=lambda v: int(v.version), reverse=True)

    @property
    def default_name(self) -> str:
        """The model an empty ``model`` field means: ``--default-model``, else the only one served."""
        if self.config.default_model:
            return self.config.default_model
        names = self.names()
        return names[0] if len(names) == 1 else ""

    def pick(self, name: str, version: str = "") -> ModelVersion:
        """The ready version a new session or a one-shot call with these fields gets."""
        name = name or self.default_name
        if not name:
            raise ModelNotFound(
                f"this server serves several models ({', '.join(self.names())}): name one in the "
                "request's model field (or start the server with --default-model)"
            )
        ready = self.ready(name)
        if not version and ready:
            return ready[0]
        for v in ready:
            if v.version == version:
                return v
        raise ModelNotFound(self._not_served(name, version))

    def by_fingerprint(self, fingerprint: str) -> ModelVersion | None:
        """The loaded version (retired ones too) a stored session ran on, if this process has it."""
        return next(
            (v for v in self.versions.values() if v.fingerprint == fingerprint and not v.closed), None
        )

    def _not_served(self, name: str, version: str) -> str:
        served = ", ".join(f"{v.name} {v.version}" for v in sorted(self._serving(), key=lambda v: v.key))
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        return (
            f"{what} is not served here; this server serves: {served or 'nothing yet'} "
            "(leave model empty for the default)"
        )

    def _serving(self) -> list[ModelVersion]:
        return [v for v in self.versions.values() if not v.retired]

    # ---- sessions on versions ------------------------------------------------------------
    def hold(self, session: SessionRecord, model: ModelVersion) -> None:
        """``session`` runs on ``model`` from now to its end."""
        session.model = model
        model.sessions.add(session)

    def let_go(self, session: SessionRecord) -> None:
        """``session`` ended (as often as it is said); a retired version with none left is closed."""
        model = session.model
        if model is not None:
            model.sessions.discard(session)
            if model.retired and not model.sessions:
                self._close_later(model)

    # ---- loading ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load what there is to serve; StartupError-worthy problems raise ModelLoadError."""
        if self.root is None:
            bundle_dir = Path(self.config.model)
            model = await self._load(None, SINGLE_VERSION, bundle_dir, signature(bundle_dir))
            self._add(model)
            return
        if not self.root.is_dir():
            raise ModelLoadError(f"--model-repository {self.root}: not a folder")
        await self.scan()
        if not self.versions:
            reasons = "".join(f"; {n} {v}: {r.reason}" for (n, v), r in self.refused.items())
            raise ModelLoadError(
                f"--model-repository {self.root}: no model version could be loaded "
                f"(expected bundles at NAME/VERSION/, VERSION a whole number){reasons}"
            )

    def on_disk(self) -> dict[str, dict[str, Path]]:
        """NAME -> VERSION -> folder, for every version folder holding a manifest."""
        found: dict[str, dict[str, Path]] = {}
        if self.root is None:
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version_dir in model_dir.iterdir():
                if version_dir.is_dir() and version_dir.name.isdigit() and (version_dir / MANIFEST).exists():
                    found.setdefault(model_dir.name, {})[str(int(version_dir.name))] = version_dir
        return found

    async def scan(self, only: str | None = None) -> None:
        """Bring what is served in line with the repository (for ``only`` that name): load new
        versions, retire those superseded or gone. One scan at a time."""
        if self.root is None:
            return
        async with self._scanning:
            disk = self.on_disk()
            names = [only] if only is not None else sorted(set(disk) | {v.name for v in self._serving()})
            for name in names:
                if name in self.unloaded and only is None:
                    continue
                await self._scan_name(name, disk.get(name, {}))

    async def _scan_name(self, name: str, on_disk: dict[str, Path]) -> None:
        keep = self.config.model_versions
        wanted = sorted(on_disk, key=int, reverse=True)
        loaded_any = False
        for version in wanted:
            if len([v for v in self.ready(name) if int(v.version) >= int(version)]) >= keep:
                break  # enough newer versions serve already
            current = self.versions.get((name, version))
            if current is not None and not current.retired:
                continue
            folder = on_disk[version]
            sig = signature(folder)
            refused = self.refused.get((name, version))
            if refused is not None and refused.signature == sig:
                continue  # the same files that failed before
            try:
                model = await self._load(name, version, folder, sig)
            except ModelLoadError as exc:
                # The index shows callers the reason without this machine's paths (the log keeps them).
                self.refused[(name, version)] = _Refused(
                    sig, str(exc).replace(str(folder), f"{name}/{version}")
                )
                self.metrics.model_loads.labels(name, version, "refused").inc()
                log.error(
                    "model %s version %s refused: %s; the versions serving go on serving", name, version, exc
                )
                continue
            self.refused.pop((name, version), None)
            if current is not None:  # a retired copy of the same version: replaced
                self._retire(current)
            self._add(model)
            loaded_any = True
        ready = self.ready(name)
        for model in ready[keep:]:  # superseded
            self._retire(model)
        for model in list(self.versions.values()):  # removed from disk
            if model.name == name and not model.retired and model.version not in on_disk:
                self._retire(model)
        if loaded_any:
            log.info(
                "model %s now serves version(s) %s", name, ", ".join(v.version for v in self.ready(name))
            )

    async def _load(self, name: str | None, version: str, folder: Path, sig: Signature) -> ModelVersion:
        """The bundle in ``folder`` loaded (checksums verified), warmed and ready to start; ``sig``
        is what the folder held when it was looked at."""
        config = self.config

        def load() -> tuple[Bundle, OnnxLM]:
            bundle = load_bundle(folder)
            # --device cuda where CUDA does not load raises RuntimeError (OnnxLM checks the provider)
            lm = OnnxLM(
                bundle,
                device=config.device,
                threads=config.intra_op_threads,
                spin=config.onnx_spin,
                spin_between_calls=False,
            )
            warm_up(lm, config.max_batch)
            return bundle, lm

        try:
            bundle, lm = await asyncio.get_running_loop().run_in_executor(None, load)
        except BundleError as exc:
            raise ModelLoadError(str(exc)) from exc
        except RuntimeError as exc:  # onnxruntime could not build a session, or start CUDA
            raise ModelLoadError(f"{folder}: {exc}") from exc
        name = name or bundle.manifest.name
        pool = StatePool(bundle.manifest.state, lm.start_state())
        batcher = Batcher(
            lm,
            pool,
            self.metrics,
            max_batch=config.max_batch,
            max_delay=config.max_delay_ms / 1000,
            chunk_tokens=config.prefill_chunk_tokens,
            prefill_call_tokens=config.prefill_call_tokens,
            persister=self.persister,
            model=(name, version),
            stats_dir=Path(config.stats_dir) if config.stats_dir else None,
        )
        batcher.open_streams = lambda: self.open_streams()
        ranker = Ranker(bundle.vocab, graph_k=bundle.manifest.topk.get("k", 0), lexicon=bundle.lexicon)
        manifest_json = (bundle.path / MANIFEST).read_text(encoding="utf-8")
        if not config.expose_manifest:  # the paths and commands of the machine that made the bundle
            manifest_json = public_manifest(manifest_json)
        return ModelVersion(name, version, bundle, lm, pool, batcher, ranker, manifest_json, sig)

    def _add(self, model: ModelVersion) -> None:
        model.batcher.start()
        self.versions[model.key] = model
        m = model.bundle.manifest
        self.metrics.model_info.labels(model.name, model.version).info(
            {"cell": m.cell, "provider": model.provider, "fingerprint": model.fingerprint}
        )
        self.metrics.model_loads.labels(model.name, model.version, "loaded").inc()

    def _retire(self, model: ModelVersion) -> None:
        if model.retired:
            return
        model.retired = True
        log.info(
            "model %s version %s takes no new sessions; its %d session(s) finish on it",
            model.name,
            model.version,
            len(model.sessions),
        )
        if not model.sessions:
            self._close_later(model)

    def _close_later(self, model: ModelVersion) -> None:
        if model.closed:
            return
        model.closed = True
        if self.versions.get(model.key) is model:
            del self.versions[model.key]
        with_labels = (model.name, model.version)
        if model.key not in self.versions:  # not reloaded under the same version meanwhile
            self.metrics.model_info.remove(*with_labels)
        asyncio.get_running_loop().create_task(model.batcher.close())
        log.info("model %s version %s unloaded", *with_labels)

    # ---- what operators do -----------------------------------------------------------------
    async def load(self, name: str) -> None:
        """Load ``name``'s versions now (KServe RepositoryModelLoad); ModelLoadError if none serves."""
        self.unloaded.discard(name)
        await self.scan(only=name)
        if not self.ready(name):
            refused = [f"version {v}: {r.reason}" for (n, v), r in self.refused.items() if n == name]
            raise ModelLoadError(
                f"model {name!r}: nothing loaded from {self.root}/{name}/"
                + (f" ({'; '.join(refused)})" if refused else " (no VERSION folder with a manifest)")
            )

    def unload(self, name: str) -> None:
        """Retire every version of ``name`` (KServe RepositoryModelUnload): open sessions finish."""
        if not self.ready(name):
            raise ModelNotFound(self._not_served(name, ""))
        self.unloaded.add(name)
        for model in self.ready(name):
            self._retire(model)

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every version on disk or loaded (KServe RepositoryIndex)."""
        rows: dict[tuple[str, str], tuple[str, str]] = {}
        for name, versions in self.on_disk().items():
            for version in versions:
                rows[(name, version)] = ("UNAVAILABLE", "not loaded (a newer one serves, or not seen yet)")
        for key, refused in self.refused.items():
            rows[key] = ("UNAVAILABLE", refused.reason)
        for key, model in self.versions.items():
            rows[key] = (
                ("UNLOADING", f"{len(model.sessions)} session(s) finishing")
                if model.retired
                else ("READY", "")
            )
        return [(n, v, *rows[(n, v)]) for n, v in sorted(rows, key=lambda k: (k[0], int(k[1])))]

    async def watch(self) -> None:
        """Rescan every ``--repository-poll`` seconds (``--model-control poll``)."""
        while True:
            await asyncio.sleep(self.config.repository_poll)
            await self.rescan()

    async def rescan(self) -> None:
        """``scan``, for a watch or a signal: a repository that cannot be read is logged, not raised."""
        try:
            await self.scan()
        except OSError as exc:  # the repository's disk went away: serve what is loaded
            log.error("model repository %s cannot be read (%s); serving what is loaded", self.root, exc)

    async def close(self) -> None:
        for model in list(self.versions.values()):
            await model.batcher.close()
        self.versions.clear()
