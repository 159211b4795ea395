"""Keystroke savings of a bundle on each kind of text, for each way of filling the strip.

    python -m benchmarks.ksr_sources [--bundle models/demo] [--chars 20000] [--results FILE]

(run from the repository root, with ``../shared/data`` beside it). Simulates typing the
first ``--chars`` characters of every file of ``mixed/test-by-source/`` and of the Gutenberg
test split with a 3-word strip (``nextword/ksr.py``, what ``nextword eval --ksr`` runs),
once per strip: by probability or by keystrokes, each with and without ``no_repeat``, and the
keystrokes strip with no repeats learning its user (``Strip.learn``: the session's cache).
Every row offers the words the model cannot name once the text has used them, as a session
does. The table goes under ``## Keystroke savings by source`` in ``benchmarks/RESULTS.md``
(only that section). Beside them, Presage's 3-gram built from the text the bundle was trained
on (``--presage-corpus``, default gutenberg: the demo's), typing the same characters with its
``REPEAT_SUGGESTIONS`` no and yes, and learning as it types (``benchmarks/presage_ksr.py``;
installs Debian's presage if missing). Simulations run two at a time, one process each; the
figures are deterministic. Below that table, each text's perplexity under the bundle (as
``nextword eval`` scores it) and under a Kneser-Ney 5-gram trained on the same training text
with the bundle's vocabulary, on the same tokens and positions (``benchmarks/kn5.py``; KenLM
is built once by ``benchmarks/kenlm/build.sh``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import kn5
from benchmarks.presage_ksr import CORPORA, ensure_presage, run_corpus, train_name
from benchmarks.results import write_section
from benchmarks.serving import ROOT
from benchmarks.serving.report import machine
from nextword.bundle import load_bundle
from nextword.evaluate import evaluate
from nextword.export.data import read_tokens
from nextword.ksr import keystroke_savings
from nextword.ranking import CACHE_WEIGHT, KEYSTROKES, PROBABILITY
from nextword.runtime import OnnxLM

SECTION = "## Keystroke savings by source"
DATA = ROOT.parent / "shared" / "data"
# (policy, no_repeat, learn): the strips a request can choose, the last as the demo page asks for it
STRIPS = (
    (PROBABILITY, False, False),
    (PROBABILITY, True, False),
    (KEYSTROKES, False, False),
    (KEYSTROKES, True, False),
    (KEYSTROKES, True, True),
)
SLOTS = 3
KN_ORDER = 5


def texts(data: Path) -> dict[str, Path]:
    """The test texts by name: each source of the mixed corpus, then the Gutenberg split."""
    found = {p.stem: p for p in sorted((data / "mixed" / "test-by-source").glob("*.txt"))}
    found["gutenberg test split"] = data / "gutenberg" / "test.txt"
    return {name: path for name, path in found.items() if path.is_file()}


def simulate(
    bundle: Path, path: Path, chars: int, policy: str, no_repeat: bool, learn: bool
) -> dict[str, float]:
    lm = OnnxLM(load_bundle(bundle), device="cpu", threads=1)
    text = path.read_text(encoding="utf-8")
    return keystroke_savings(
        lm,
        text,
        slots=SLOTS,
        max_chars=chars,
        policy=policy,
        no_repeat=no_repeat,
        learn=CACHE_WEIGHT if learn else 0.0,
    )


def render(
    args: argparse.Namespace,
    names: list[str],
    ksr: dict[tuple[str, str, bool, bool], float],
    presage: dict[tuple[str, str], float],
    perplexity: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> str:
    mach = machine()
    head = " | ".join(
        f"nextword {p}{' + no repeat' if r else ''}{' + learn' if n else ''}" for p, r, n in STRIPS
    )
    train = train_name(args.presage_corpus)
    lines = [
        f"`python -m benchmarks.ksr_sources --bundle {args.bundle} --presage-corpus {args.presage_corpus}` "
        f"at {mach['revision']}, "
        f"{time.strftime('%Y-%m-%d')}: the first {args.chars:,} characters of each text, a {SLOTS}-word "
        "strip, counted as `nextword eval --ksr` counts (see `## Keystroke savings`). Every nextword "
        "column offers a word the model cannot name once the text has used it (sessions do); the "
        "columns are the strips a request can choose (`Strip` in the API, `--strip`/`--no-repeat` "
        f"of `nextword eval`). Presage: its 3-gram from {args.presage_corpus}/{train} (the "
        "text the demo was trained on), online learning off, hiding (no) or re-offering (yes) what "
        "it showed within a word, and learning as it types (its default; repeats no). Ratios: "
        "nextword's keystrokes strip with no repeats against Presage with none (both hide what "
        "was passed over), both not learning; then nextword's same strip learning its user "
        "(`Strip.learn`, λ = 0.05, as the demo page asks) against Presage learning off and on.",
        "",
        f"| text | {head} | Presage, repeats no | Presage, repeats yes | Presage learning | ratio | "
        "ratio, nextword learning | ratio, both learning |",
        "|---|" + "---|" * (len(STRIPS) + 6),
    ]
    for name in names:
        cells = [ksr[(name, *strip)] for strip in STRIPS]
        best = max(cells)
        ours, learned = ksr[(name, KEYSTROKES, True, False)], ksr[(name, KEYSTROKES, True, True)]
        theirs, learning = presage[(name, "no")], presage[(name, "learn")]
        lines.append(
            f"| {name} | "
            + " | ".join(f"**{c:.2%}**" if c == best else f"{c:.2%}" for c in cells)
            + f" | {theirs:.2%} | {presage[(name, 'yes')]:.2%} | {learning:.2%} | "
            + f"**{ours / theirs:.2f}×** | **{learned / theirs:.2f}×** | {learned / learning:.2f}× |"
        )
    lines += [
        "",
        f"Perplexity of each whole text (not only its first {args.chars:,} characters), the bundle's "
        f"as `nextword eval` scores it and a Kneser-Ney {KN_ORDER}-gram's (KenLM, trained on the same "
        f"{args.presage_corpus}/{train} with the bundle's vocabulary), same tokens, same positions:",
        "",
        "| text | tokens scored | nextword | KN-5 | nextword / KN-5 |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        ours_ppl, kn = perplexity[name]
        lines.append(
            f"| {name} | {ours_ppl['tokens']:,} | {ours_ppl['perplexity']:.2f} | {kn['perplexity']:.2f} | "
            f"**{ours_ppl['perplexity'] / kn['perplexity']:.2f}×** |"
        )
    return "\n".join(lines) + "\n"


PRESAGE = {"no": (False, False), "yes": (True, False), "learn": (False, True)}  # repeat, learn


def presage_ksr(args: argparse.Namespace, found: dict[str, Path]) -> dict[tuple[str, str], float]:
    """Presage's keystroke savings on each text: REPEAT_SUGGESTIONS no and yes with learning off,
    and no with learning on (its default: it learns from what is typed, from nothing each run)."""
    ensure_presage()
    run_corpus(args.presage_corpus, args.data_root, args.chars, SLOTS, False)  # builds its database once

    def one(path: Path, repeat: bool, learn: bool) -> float:
        counts = run_corpus(args.presage_corpus, args.data_root, args.chars, SLOTS, repeat, path, learn=learn)
        return counts["KSR"] / 100

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {
            (name, how): pool.submit(one, path, *PRESAGE[how])
            for name, path in found.items()
            for how in PRESAGE
        }
        return {key: run.result() for key, run in runs.items()}


def perplexities(
    args: argparse.Namespace, found: dict[str, Path]
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each text's perplexity under the bundle and under KN-5 on the bundle's training text and
    vocabulary (the training text read as the bundle's training read it)."""
    bundle = load_bundle(args.bundle)
    lm = OnnxLM(bundle, device="cpu")
    ours = {name: evaluate(args.bundle, path, lm=lm) for name, path in found.items()}
    train_file = args.data_root / args.presage_corpus / train_name(args.presage_corpus)
    train = read_tokens(train_file, bundle.manifest.training.get("format", "auto"))
    with tempfile.TemporaryDirectory(prefix="kn5-") as tmp:
        arpa, _ = kn5.build_arpa(train, bundle.vocab, Path(tmp), order=KN_ORDER)
        texts = {name: bundle.vocab.encode(read_tokens(path)) for name, path in found.items()}
        theirs = kn5.score(arpa, bundle.vocab, texts, order=KN_ORDER)
    return {name: (ours[name], theirs[name]) for name in found}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("models/demo"))
    p.add_argument("--chars", type=int, default=20000, help="first N characters of each text")
    p.add_argument("--data-root", type=Path, default=DATA, help="the shared data directory")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument(
        "--presage-corpus",
        default="gutenberg",
        choices=CORPORA,
        help="Presage's training text: the bundle's (mixed: its train-open.txt)",
    )
    args = p.parse_args(argv)
    found = texts(args.data_root)
    if not found:
        print(f"ksr_sources: no test texts under {args.data_root}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {
            (name, *strip): pool.submit(simulate, args.bundle, path, args.chars, *strip)
            for name, path in found.items()
            for strip in STRIPS
        }
        ksr = {key: future.result()["ksr"] for key, future in futures.items()}
    for key, value in ksr.items():
        print(
            f"{key[0]:22s} {key[1]:12s} no_repeat={key[2]!s:5s} learn={key[3]!s:5s} {value:.2%}", flush=True
        )
    presage = presage_ksr(args, found)
    for (name, how), value in presage.items():
        print(f"{name:22s} presage      {how:5s}    {value:.2%}", flush=True)
    perplexity = perplexities(args, found)
    for name, (ours, theirs) in perplexity.items():
        print(f"{name:22s} perplexity {ours['perplexity']:.2f} KN-5 {theirs['perplexity']:.2f}", flush=True)
    write_section(args.results, SECTION, render(args, list(found), ksr, presage, perplexity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
