"""Interpolated modified Kneser–Ney n-gram baseline (KenLM ``lmplz``) on nextword's own tokens.

    python benchmarks/kn5.py --data ../shared/data/gutenberg [--order 5] [--json]

Same tokens, same vocabulary, same scored positions as our models:

* The splits are tokenized by ``export.data.read_tokens`` with the format ``nextword train``
  resolves from train.txt, and the vocabulary is ``Vocab.build(train, max_size=10000,
  min_count=2)`` as ``nextword train`` builds it (or ``--vocab`` a run's ``vocab.txt``).
* lmplz reads one ``<eos>``-terminated segment per line, OOVs written as ``<oov>`` (lmplz
  refuses ``<unk>`` in its input). KenLM appends ``</s>`` to every line and predicts it, so
  each of our tokens, ``<eos>`` included, is one event, as in our training stream.
  ``<s>`` is KenLM's begin-of-line context: it is never predicted, and it stands for "just
  after an ``<eos>``" (or the start of the file). So n-grams do not cross segment ends: the
  context of a token is at most ``order - 1`` preceding tokens of its own segment, after
  ``<s>``. (Our recurrent models carry their state across segments; the n-gram model simply
  has nothing to carry.)
* Scored positions are exactly those of ``nextword eval`` (``nextword/evaluate.py``): the
  split is cut into ``--columns`` (32) contiguous columns, the first token of each column
  and the tail that does not fill a column are not scored. The n-gram context is not cut at
  column starts (the model has no state to reset).
* KenLM's own ``<unk>`` (mass the interpolation gives to unseen words; our OOVs are ``<oov>``
  instead) is no word of ours: it is never a candidate, so KN is charged the probability it
  holds (its unigram is 5e-6 on Gutenberg, 4e-6 on Brown, scaled by the backoff weights).
  A vocabulary word absent from train.txt (possible with ``--vocab``) is scored as KenLM
  scores it, as its ``<unk>``, and counts as a miss.

Probabilities and top-k come from the ARPA file, read in Python; see ``BackoffLM``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nextword.export.data import read_tokens, resolve_format
from nextword.tokenizer import EOS, UNK, Vocab

ROOT = Path(__file__).resolve().parents[1]

BUILD_SCRIPT = ROOT / "benchmarks" / "kenlm" / "build.sh"
OOV = "<oov>"  # how our <unk> is spelled for lmplz
Context = tuple[int, ...]


def kenlm_tools() -> Path:
    """Directory holding lmplz/query/build_binary (built once by benchmarks/kenlm/build.sh)."""
    # stderr passes through: a first build takes minutes and says what it is doing.
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1]).parent


def segments(ids: Sequence[int], eos: int) -> Iterator[Sequence[int]]:
    """The ``<eos>``-terminated segments of a token stream, without their ``<eos>``."""
    start = 0
    for i, t in enumerate(ids):
        if t == eos:
            yield ids[start:i]
            start = i + 1
    if start != len(ids):
        raise ValueError("token stream does not end in <eos>")


def write_lmplz_text(ids: Sequence[int], vocab: Vocab, path: Path) -> None:
    """One segment per line, space-separated; lmplz adds <s> and </s> itself."""
    spelled = [OOV if w == UNK else w for w in vocab.words]
    with path.open("w", encoding="utf-8") as f:
        for seg in segments(ids, vocab.eos_id):
            f.write(" ".join(spelled[t] for t in seg) + "\n")


def run_lmplz(lmplz: Path, text: Path, arpa: Path, *, order: int, memory: str, fallback: bool) -> list[str]:
    cmd = [str(lmplz), "-o", str(order), "-S", memory, "-T", str(arpa.parent), "--text", str(text)]
    cmd += ["--arpa", str(arpa)] + (["--discount_fallback"] if fallback else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lmplz failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return cmd


def contexts(ids: Sequence[int], eos: int, bos: int, order: int) -> Iterator[Context]:
    """The n-gram context of every position: up to ``order - 1`` tokens of its segment after <s>."""
    ctx: Context = (bos,)
    for t in ids:
        yield ctx
        ctx = (bos,) if t == eos else (*ctx, t)[-(order - 1) :]


def scored_positions(n: int, columns: int) -> Iterator[int]:
    """Positions ``nextword eval`` scores: each column but its first token, no ragged tail."""
    steps = n // columns
    for b in range(columns):
        yield from range(b * steps + 1, (b + 1) * steps)


class BackoffLM:
    """A backoff n-gram model read from ARPA, with exact top-k next-word queries.

    ARPA semantics (what KenLM's query computes): for context ``h`` (oldest word first),
    ``log p(w|h) = P(h, w)`` when the n-gram ``h w`` is listed, else ``B(h) + log p(w|h[1:])``,
    where ``B(h)`` is the backoff weight listed with ``h`` (0 when ``h`` is not listed).
    Unrolled: a word's score is ``B(h_m) + ... + B(h_{j+1}) + P(h_j, w)`` where ``h_j`` is the
    longest suffix of ``h`` that ``w`` was seen after (``h_0`` = empty, every word).

    Top-k without scoring the whole vocabulary: the words whose longest suffix is ``h_j`` all
    share the backoff prefix sum, so among them the order is the order of ``P(h_j, ·)``. Each
    suffix's successors are kept sorted, and the k best of every level (skipping words that a
    longer suffix already scores) contain the overall k best. Levels are walked longest first,
    and a level stops as soon as its (sorted) scores fall below the k-th best found so far,
    which bounds everything left, so the unigram level costs a few steps instead of the
    vocabulary. Ties are broken by word id, as a sort over the whole vocabulary would.

    Only what queries for the given contexts can touch is loaded: n-grams whose context is a
    suffix of one of them (their successors) and the suffixes themselves (their backoffs).
    """

    def __init__(self, arpa: Path, word_ids: dict[str, int], needed: Iterable[Context] | None = None):
        suffixes: set[Context] | None = None
        if needed is not None:
            suffixes = {c[i:] for c in needed for i in range(len(c) + 1)}
        self.successors: dict[Context, dict[int, float]] = {}
        self.backoff: dict[Context, float] = {}
        section = 0  # n of the \\n-grams: section being read
        with arpa.open(encoding="utf-8") as f:
            for line in f:
                if line.startswith("\\") and line.rstrip().endswith("-grams:"):
                    section = int(line[1 : line.index("-")])
                    continue
                fields = line.rstrip("\n").split("\t")
                if section == 0 or len(fields) < 2:
                    continue
                try:
                    gram = tuple(word_ids[w] for w in fields[1].split(" "))
                except KeyError as exc:
                    raise ValueError(f"{arpa}: word {exc} is not in the vocabulary") from None
                ctx = gram[:-1]
                if suffixes is None or ctx in suffixes:
                    self.successors.setdefault(ctx, {})[gram[-1]] = float(fields[0])
                if len(fields) > 2 and (suffixes is None or gram in suffixes):
                    self.backoff[gram] = float(fields[2])
        self._ranked: dict[Context, list[int]] = {}
        self.excluded: set[int] = set()

    def logprob(self, ctx: Context, word: int) -> float:
        """log10 p(word | ctx), as ARPA files and KenLM keep them."""
        backoff = 0.0
        for j in range(len(ctx) + 1):
            h = ctx[j:]
            seen = self.successors.get(h)
            if seen is not None and word in seen:
                return backoff + seen[word]
            backoff += self.backoff.get(h, 0.0)
        raise KeyError(f"word {word} has no unigram")

    def ranked(self, h: Context) -> list[int]:
        """Successors of ``h``, best first (ties by id), sorted once on first use."""
        order = self._ranked.get(h)
        if order is None:
            seen = self.successors[h]
            order = sorted(seen, key=lambda w: (-seen[w], w))
            self._ranked[h] = order
        return order

    def topk(self, ctx: Context, k: int) -> list[int]:
        """The k most probable next words (best first), never one of ``self.excluded``."""
        found: list[tuple[float, int]] = []
        longer: list[dict[int, float]] = []
        backoff = 0.0
        for j in range(len(ctx) + 1):
            h = ctx[j:]
            seen = self.successors.get(h)
            if seen is not None:
                kth = sorted(s for s, _ in found)[-k] if len(found) >= k else -math.inf
                taken = 0
                for w in self.ranked(h):
                    score = backoff + seen[w]
                    if score < kth or taken == k:
                        break
                    if w in self.excluded or any(w in s for s in longer):
                        continue  # scored by a longer context, or not a word of ours
                    found.append((score, w))
                    taken += 1
                longer.append(seen)
            backoff += self.backoff.get(h, 0.0)
        found.sort(key=lambda sw: (-sw[0], sw[1]))
        return [w for _, w in found[:k]]


def kenlm_word_ids(vocab: Vocab) -> tuple[dict[str, int], int, int]:
    """ARPA spelling -> id: our words (``<oov>`` is our ``<unk>``, ``</s>`` our ``<eos>``),
    plus ids for KenLM's ``<s>`` and ``<unk>`` just past our vocabulary."""
    ids = {(OOV if w == UNK else w): i for i, w in enumerate(vocab.words) if w != EOS}
    bos, kenlm_unk = len(vocab), len(vocab) + 1
    ids.update({"</s>": vocab.eos_id, "<s>": bos, "<unk>": kenlm_unk})
    return ids, bos, kenlm_unk


def evaluate(
    lm: BackoffLM, ids: Sequence[int], ctxs: Sequence[Context], positions: Iterable[int], kenlm_unk: int
) -> dict[str, Any]:
    """Perplexity, top-1 and top-3 accuracy at ``positions`` (each predicted from ``ctxs[i]``)."""
    log10_sum, top1, top3, n = 0.0, 0, 0, 0
    unigrams = lm.successors[()]
    for i in positions:
        target = ids[i] if ids[i] in unigrams else kenlm_unk  # unseen in train: KenLM's <unk>
        log10_sum += lm.logprob(ctxs[i], target)
        best = lm.topk(ctxs[i], 3)
        top1 += best[:1] == [target]
        top3 += target in best
        n += 1
    return {"perplexity": 10 ** (-log10_sum / n), "top1": top1 / n, "top3": top3 / n, "tokens": n}


def build_arpa(
    train: Sequence[str],
    vocab: Vocab,
    workdir: Path,
    *,
    order: int,
    memory: str = "1G",
    fallback: bool = False,
) -> tuple[Path, list[str]]:
    """KN ``order``-gram of the tokens ``train`` on ``vocab``'s words (lmplz): the ARPA file and
    the lmplz command line."""
    text, arpa = workdir / "train.lmplz.txt", workdir / f"kn{order}.arpa"
    write_lmplz_text(vocab.encode(train), vocab, text)
    cmd = run_lmplz(kenlm_tools() / "lmplz", text, arpa, order=order, memory=memory, fallback=fallback)
    return arpa, cmd


def score(
    arpa: Path, vocab: Vocab, texts: dict[str, list[int]], *, order: int, columns: int = 32
) -> dict[str, dict[str, Any]]:
    """Perplexity, top-1 and top-3 of the ARPA model on each token-id stream of ``texts``, at the
    positions ``nextword eval`` scores with ``columns`` columns."""
    word_ids, bos, kenlm_unk = kenlm_word_ids(vocab)
    ctxs = {name: list(contexts(ids, vocab.eos_id, bos, order)) for name, ids in texts.items()}
    lm = BackoffLM(arpa, word_ids, needed=(c for cs in ctxs.values() for c in cs))
    lm.excluded = {bos, kenlm_unk}
    return {
        name: evaluate(lm, ids, ctxs[name], scored_positions(len(ids), columns), kenlm_unk)
        for name, ids in texts.items()
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fmt = resolve_format(args.data / "train.txt", args.format)
    train = read_tokens(args.data / "train.txt", fmt)
    if args.vocab:
        vocab = Vocab.load(args.vocab)
    else:
        vocab = Vocab.build(train, max_size=args.vocab_size, min_count=args.min_count)

    t0 = time.monotonic()
    arpa, lmplz_cmd = build_arpa(
        train, vocab, workdir, order=args.order, memory=args.memory, fallback=args.discount_fallback
    )
    t1 = time.monotonic()
    texts = {split: vocab.encode(read_tokens(args.data / f"{split}.txt", fmt)) for split in args.splits}
    results = score(arpa, vocab, texts, order=args.order, columns=args.columns)
    return {
        "model": f"KenLM lmplz interpolated modified Kneser-Ney {args.order}-gram",
        "data": str(args.data),
        "format": fmt,
        "order": args.order,
        "vocab_size": len(vocab),
        "train_tokens": len(train),
        "splits": results,
        "seconds": {
            "lmplz": round(t1 - t0, 1),
            "load_and_score": round(time.monotonic() - t1, 1),
        },
        "lmplz": shlex.join(["lmplz", *lmplz_cmd[1:]]),
        "command": shlex.join(["python", "benchmarks/kn5.py", *args.argv]),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", type=Path, required=True, help="corpus directory with train/valid/test.txt")
    p.add_argument("--format", default="auto", choices=["auto", "raw", "lines"])
    p.add_argument("--order", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--min-count", type=int, default=2)
    p.add_argument("--vocab", type=Path, help="a run's vocab.txt instead of building one from train.txt")
    p.add_argument("--splits", nargs="+", default=["valid", "test"])
    p.add_argument("--columns", type=int, default=32, help="as `nextword eval`: positions scored alike")
    p.add_argument("--memory", default="1G", help="lmplz -S (its default takes 80%% of RAM)")
    p.add_argument("--discount-fallback", action="store_true", help="lmplz --discount_fallback (tiny data)")
    p.add_argument("--workdir", type=Path, help="keep lmplz's input and the ARPA file here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    if args.order < 2:
        p.error("--order must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="kn5-") as tmp:
            result = run(args, Path(tmp))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']} on {result['data']} ({result['vocab_size']:,} words)")
    print(f"{'split':<8}{'perplexity':>12}{'top-1':>9}{'top-3':>9}{'tokens':>10}")
    for split, r in result["splits"].items():
        print(f"{split:<8}{r['perplexity']:>12.2f}{r['top1']:>9.2%}{r['top3']:>9.2%}{r['tokens']:>10,}")
    print(f"command: {result['command']}\nlmplz:   {result['lmplz']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
