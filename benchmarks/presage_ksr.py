"""Keystroke savings of Presage (Debian's ``presage``), the n-gram peer of ``nextword eval --ksr``.

    python benchmarks/presage_ksr.py                      # gutenberg and brown, first 20,000 chars
    python benchmarks/presage_ksr.py --corpus gutenberg --chars 20000 --slots 3
    python benchmarks/presage_ksr.py --corpus gutenberg --test ../shared/data/mixed/test-by-source/abc.txt
    python benchmarks/presage_ksr.py --corpus mixed --test ../shared/data/mixed/test-by-source/abc.txt

For each corpus: installs ``presage`` if missing (apt), builds Presage's n-gram
database (orders 1..3, lower-cased) from the corpus's train split (mixed:
``train-open.txt``, the text a shipped model may train on) with its own
``text2ngram``, writes a copy of ``/etc/presage.xml`` whose only predictor is
that 3-gram (``DefaultSmoothedNgramPredictor``, default deltas) with
``SUGGESTIONS`` = the strip size, and runs ``presage_simulator -i`` (case
insensitive, as nextword's lower-casing model is) on the first ``--chars``
characters of the test split. Everything it builds lives in the ignored
``benchmarks/.cache/presage/``, the counts of each run too (the simulation is
deterministic: a run with the same database, settings and text is read back,
not typed again); the corpora are only read.

Settings chosen for a like-for-like comparison (see ``nextword/ksr.py`` for how
our count mirrors ``presage_simulator``'s):

* Only the n-gram predictor: the default profile also runs a user n-gram model
  that learns from the simulated text and persists it to ``~/.presage/lm.db``
  (a second run would have seen the test text) and a recency cache; neither
  has a counterpart in nextword. ``ONLINE_LEARNING`` is off for the same reason.
* ``REPEAT_SUGGESTIONS`` keeps Presage's default (``no``): within a word,
  Presage hides suggestions it already offered, while nextword's strip may
  repeat them; ``--repeat`` sets it to ``yes``, the strip nextword shows.
* ``presage_simulator`` starts its selection counter ``ks`` at 1 and counts an
  empty last token when the text ends in a space or punctuation: at most two
  keystrokes on ~20,000, printed as it reports them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "presage"
DATA = ROOT.parent / "shared" / "data"
CORPORA = ("gutenberg", "brown", "mixed")
# The split a corpus's Presage is built from: mixed's train-open.txt is the text a shipped model
# may train on (../shared/data/mixed/README), so a Presage beside such a model reads the same.
TRAIN_FILE = {"mixed": "train-open.txt"}


def train_name(corpus: str) -> str:
    """The file of ``corpus`` a model (and Presage) may train on."""
    return TRAIN_FILE.get(corpus, "train.txt")


SYSTEM_CONFIG = Path("/etc/presage.xml")
NGRAM_ORDER = 3  # the default profile's DELTAS (0.01 0.1 0.89) make a 3-gram
PREDICTOR = "DefaultSmoothedNgramPredictor"
LEARNERS = ["UserSmoothedNgramPredictor", "DefaultRecencyPredictor"]  # what Presage learns with by default


def ensure_presage() -> None:
    if shutil.which("presage_simulator") and shutil.which("text2ngram"):
        return
    print("installing Debian's presage (apt-get)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "presage"], check=True, env=env)


def build_database(train: Path, out_dir: Path) -> Path:
    """Presage's sqlite n-gram tables 1..3 of ``train``, rebuilt only when the train file changes."""
    db = out_dir / "ngram.db"
    stamp = out_dir / "ngram.db.source"
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    source = f"{train.resolve()} sha256={digest} orders=1..{NGRAM_ORDER} lowercase\n"
    if db.exists() and stamp.exists() and stamp.read_text() == source:
        return db
    partial = out_dir / "ngram.db.partial"
    partial.unlink(missing_ok=True)
    for n in range(1, NGRAM_ORDER + 1):
        print(f"text2ngram -n {n}: {train}", file=sys.stderr)
        # One table per order in the same file; -l so counts match the lower-cased simulation.
        cmd = ["text2ngram", "-n", str(n), "-l", "-f", "sqlite", "-o", str(partial), str(train)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    partial.replace(db)  # a killed build never leaves a database that looks complete
    stamp.write_text(source)
    return db


def write_config(
    db: Path, slots: int, path: Path, *, repeat: bool = False, learn: Path | None = None
) -> Path:
    """Presage's configuration. ``learn``: with its default learning parts on, its user n-gram
    model learning into this (new) database as the text is typed, and its recency predictor."""
    # Keep the system file's comments: they document every setting left at its default.
    tree = ET.parse(SYSTEM_CONFIG, parser=ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    root = tree.getroot()

    def set_text(xpath: str, value: str) -> None:
        node = root.find(xpath)
        if node is None:
            raise SystemExit(f"{SYSTEM_CONFIG} has no {xpath}: is this presage 0.9?")
        node.text = value

    predictors = [PREDICTOR, *(LEARNERS if learn else [])]
    set_text("PredictorRegistry/PREDICTORS", " ".join(predictors))
    set_text("ContextTracker/ONLINE_LEARNING", "yes" if learn else "no")
    if learn:
        set_text("Predictors/UserSmoothedNgramPredictor/DBFILENAME", str(learn))
    set_text("Selector/SUGGESTIONS", str(slots))
    set_text("Selector/REPEAT_SUGGESTIONS", "yes" if repeat else "no")
    set_text(f"Predictors/{PREDICTOR}/DBFILENAME", str(db))
    tree.write(path, encoding="UTF-8", xml_declaration=True)
    return path


def simulate(config: Path, text_file: Path) -> dict[str, float]:
    out = subprocess.run(
        ["presage_simulator", "-q", "-i", "-c", str(config), str(text_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts = {k: float(v) for k, v in re.findall(r"^(ki|ks|kn|KSR)\s*:\s*(\S+)$", out, re.M)}
    if set(counts) != {"ki", "ks", "kn", "KSR"}:
        raise RuntimeError(f"unexpected presage_simulator output:\n{out}")
    return counts


def run_corpus(
    corpus: str,
    data_root: Path,
    chars: int,
    slots: int,
    repeat: bool,
    test: Path | None = None,
    *,
    learn: bool = False,
) -> dict[str, float]:
    """Presage trained on ``corpus``'s train split, typing its test split (or ``test``); ``learn``:
    learning as it types, from nothing (a new user database each run)."""
    out_dir = CACHE / corpus
    out_dir.mkdir(parents=True, exist_ok=True)
    db = build_database(data_root / corpus / train_name(corpus), out_dir)
    test = test or data_root / corpus / "test.txt"
    # The same characters nextword eval --ksr --ksr-chars reads (characters, not bytes).
    text = test.read_text(encoding="utf-8")[:chars]
    name = f"presage-{slots}{'-repeat' if repeat else ''}{'-learn' if learn else ''}"
    # The simulation is deterministic: its counts are kept, keyed by all they depend on (the
    # database's source, Presage's own configuration, these settings, the text), so that scoring
    # another bundle against the same texts does not type them again (90 s a run).
    source = (out_dir / "ngram.db.source").read_bytes()
    parts = [source, SYSTEM_CONFIG.read_bytes(), name.encode(), text.encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    kept = out_dir / f"{name}-{key}.json"
    if kept.exists():
        counts: dict[str, float] = json.loads(kept.read_text())
        return counts
    text_file = out_dir / f"typed-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    # Runs may type one text at once (with and without repeats): a whole file, swapped in, never a
    # half-written one.
    partial = text_file.with_suffix(f".{os.getpid()}-{threading.get_ident()}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(text_file)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        user_db = Path(tmp) / "user.db" if learn else None
        config = write_config(db, slots, Path(tmp) / f"{name}.xml", repeat=repeat, learn=user_db)
        counts = simulate(config, text_file)
        written = Path(tmp) / kept.name
        written.write_text(json.dumps(counts))
        written.replace(kept)  # whole or not at all
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--corpus",
        action="append",
        choices=CORPORA,
        help="default: gutenberg and brown (mixed: its train-open.txt)",
    )
    p.add_argument("--chars", type=int, default=20000, help="first N characters of test.txt")
    p.add_argument("--slots", type=int, default=3, help="suggestions shown (Presage's SUGGESTIONS)")
    p.add_argument(
        "--repeat",
        action="store_true",
        help="REPEAT_SUGGESTIONS yes: re-offer words already shown for this word, as nextword's strip does",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=DATA,
        help="directory holding <corpus>/{train,test}.txt (mixed: train-open.txt)",
    )
    p.add_argument("--test", type=Path, help="type this text instead of the corpus's test.txt")
    p.add_argument("--learn", action="store_true", help="Presage learns as it types (its default)")
    args = p.parse_args(argv)
    ensure_presage()
    for corpus in args.corpus or ["gutenberg", "brown"]:
        r = run_corpus(
            corpus, args.data_root, args.chars, args.slots, args.repeat, args.test, learn=args.learn
        )
        repeat = "yes" if args.repeat else "no"
        print(
            f"{corpus}: Presage 3-gram KSR {r['KSR']:.2f}%  (ki {r['ki']:.0f}, ks {r['ks']:.0f}, "
            f"kn {r['kn']:.0f}; {args.slots} suggestions, REPEAT_SUGGESTIONS {repeat}, "
            f"learning {'on' if args.learn else 'off'}, "
            f"first {args.chars:,} chars of {args.test or 'test.txt'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
