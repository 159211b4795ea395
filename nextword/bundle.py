"""The model bundle: what ``nextword export`` writes and ``nextword serve`` loads.

A bundle is a directory::

    manifest.json   this schema (format version, cell, sizes, state spec,
                    tokenizer spec, training data and metrics, sha256 of files)
    model.onnx      step graph: (tokens[batch, seq], *state) -> (log_probs, *state')
    head.onnx       head graph: (*state) -> log_probs, for a reply with no new word
    vocab.txt       one token per line; the id is the line number

The server reads nothing but the manifest to know how to drive the graphs: the
recurrent state is a list of named tensors, each paired input<->output by name
(never by position), with its shape and the axis that holds the batch. Any
cell (LSTM's h and c, a GRU's h, a delay-d RNN's last d hidden states) fits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nextword.tokenizer import (
    TOKENIZER_NAME,
    TOKENIZER_VERSION,
    Lexicon,
    Vocab,
    corpus_tokens,
    looks_pretokenized,
)

# The demo bundle ships inside the package (in a checkout, a link to models/demo).
DEMO_BUNDLE = Path(__file__).resolve().parent / "demo"

FORMAT = "nextword-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH = "batch"  # the symbolic batch dimension in state shapes


class BundleError(ValueError):
    """A bundle that cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class StateTensor:
    """One recurrent state tensor, fed as ``input`` and read back as ``output``."""

    name: str
    input: str
    output: str
    shape: list[int | str]  # exactly one entry is BATCH
    dtype: str = "float32"

    @property
    def batch_axis(self) -> int:
        return self.shape.index(BATCH)

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class Graph:
    file: str
    inputs: list[str]
    outputs: list[str]


@dataclass
class Manifest:
    name: str
    cell: str
    model: dict[str, Any]  # sizes: vocab_size, embedding_dim, hidden_size, num_layers, ...
    step: Graph  # inputs: tokens, state inputs; outputs: log_probs, state outputs[, topk outputs]
    head: Graph  # inputs: state inputs it uses; outputs: log_probs[, topk outputs]
    state: list[StateTensor]
    tokenizer: dict[str, Any]
    vocab_file: str = "vocab.txt"
    vocab_size: int = 0
    # Words of the training text outside the vocabulary, with counts (Lexicon): "" for none.
    lexicon_file: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    # In-graph ranking, when the graphs have it: {"k": K, "values": name, "ids": name}, the top K
    # offerable words (is_word) by log-probability, an extra output of both graphs.
    topk: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @property
    def fingerprint(self) -> str:
        """Names these exact files (graphs, vocabulary): the name and a digest of their checksums.

        A recurrent state means something only to the graphs that wrote it: a stored session
        resumes only where the fingerprint is the same.
        """
        digest = hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()
        return f"{self.name}@{digest[:16]}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            fields = dict(data)
            fields["step"] = Graph(**data["step"])
            fields["head"] = Graph(**data["head"])
            fields["state"] = [StateTensor(**s) for s in data["state"]]
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest is missing or has a malformed field: {exc}") from exc


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Checksum every file of the bundle into the manifest, then write it."""
    manifest.files = {
        p.name: sha256(p) for p in sorted(bundle_dir.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (bundle_dir / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")


LEXICON = "lexicon.txt"


def build_lexicon(bundle_dir: Path, manifest: Manifest, vocab: Vocab) -> Lexicon | None:
    """Write the lexicon of the training text ``manifest`` names into the bundle and name it there
    (the caller writes the manifest); None when that text is not here, or is not the one trained on."""
    train = manifest.training.get("data", {}).get("train", {})
    path = Path(train.get("path", ""))
    if not train or not path.is_file() or sha256(path) != train.get("sha256"):
        return None
    text = path.read_text(encoding="utf-8")
    fmt = manifest.training.get("format", "auto")
    lines = fmt == "lines" or (fmt == "auto" and looks_pretokenized(text))
    lexicon = Lexicon.build(corpus_tokens(text, line_per_sentence=lines), vocab)
    lexicon.save(bundle_dir / LEXICON)
    manifest.lexicon_file = LEXICON
    return lexicon


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    vocab: Vocab
    lexicon: Lexicon | None = None

    @property
    def step_path(self) -> Path:
        return self.path / self.manifest.step.file

    @property
    def head_path(self) -> Path:
        return self.path / self.manifest.head.file


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load and validate a bundle; raise BundleError saying what is wrong."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root}: not a model bundle (no {MANIFEST}); make one with `nextword export`")
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{root / MANIFEST}: not valid JSON ({exc})") from exc
    if data.get("format") != FORMAT:
        raise BundleError(f"{root / MANIFEST}: format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{root}: bundle format version {data.get('format_version')} is not supported "
            f"(this nextword reads version {FORMAT_VERSION}); re-export it with this version"
        )
    manifest = Manifest.from_dict(data)
    _check(root, manifest, verify=verify)
    try:
        vocab = Vocab.load(root / manifest.vocab_file)
    except (ValueError, OSError) as exc:  # ValueError: bad UTF-8 too; a checksum cannot vouch for content
        raise BundleError(
            f"{root}: {manifest.vocab_file} is not a usable vocabulary ({exc}); re-export the bundle"
        ) from exc
    if len(vocab) != manifest.vocab_size:
        raise BundleError(f"{root}: vocab.txt has {len(vocab)} entries, manifest says {manifest.vocab_size}")
    return Bundle(root, manifest, vocab, _lexicon(root, manifest, vocab))


def _lexicon(root: Path, manifest: Manifest, vocab: Vocab) -> Lexicon | None:
    """The bundle's lexicon, checked once here: none of its words may be the vocabulary's (the
    ranker offers them as words the model cannot name)."""
    if not manifest.lexicon_file:
        return None
    try:
        lexicon = Lexicon.load(root / manifest.lexicon_file)
        known = next((w for w in lexicon.words if vocab.id(w) != vocab.unk_id), None)
        if known is not None:
            raise ValueError(f"{known!r} is a vocabulary word")
    except (ValueError, OSError) as exc:  # ValueError: a line that is not "word<TAB>count" too
        raise BundleError(
            f"{root}: {manifest.lexicon_file} is not a usable lexicon ({exc}); re-export the bundle"
        ) from exc
    return lexicon


def _check(root: Path, m: Manifest, *, verify: bool) -> None:
    spec = m.tokenizer
    if spec.get("name") != TOKENIZER_NAME or spec.get("version") != TOKENIZER_VERSION:
        raise BundleError(
            f"{root}: tokenizer {spec.get('name')}/{spec.get('version')} is not supported "
            f"(expected {TOKENIZER_NAME}/{TOKENIZER_VERSION})"
        )
    if not m.state:
        raise BundleError(f"{root}: manifest declares no recurrent state")
    for s in m.state:
        if s.shape.count(BATCH) != 1:
            raise BundleError(
                f"{root}: state {s.name!r} shape {s.shape} must have exactly one {BATCH!r} axis"
            )
    state_in = [s.input for s in m.state]
    if m.step.inputs[1:] != state_in or m.step.outputs[1 : 1 + len(m.state)] != [s.output for s in m.state]:
        raise BundleError(f"{root}: step graph inputs/outputs do not match the state spec")
    if m.topk:
        ranked = {m.topk.get("values"), m.topk.get("ids")}
        if (
            not ranked <= set(m.step.outputs)
            or not ranked <= set(m.head.outputs)
            or int(m.topk.get("k", 0)) < 1
        ):
            raise BundleError(f"{root}: manifest topk {m.topk} does not name outputs of both graphs")
    if not set(m.head.inputs) <= set(state_in):
        raise BundleError(f"{root}: head graph reads inputs that are not state tensors: {m.head.inputs}")
    for name in (m.step.file, m.head.file, m.vocab_file, *([m.lexicon_file] if m.lexicon_file else [])):
        if name not in m.files:
            raise BundleError(f"{root}: manifest has no checksum for {name}")
    for name, digest in m.files.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"{root}: {name} is listed in the manifest but missing")
        if verify and sha256(file) != digest:
            raise BundleError(f"{root}: {name} does not match its sha256 in the manifest (corrupt or edited)")
