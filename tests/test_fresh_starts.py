"""benchmarks/fresh_starts.py: columns scored from the zero state and after <eos>, and the first
words that spoil what follows, on a real (tiny) trained run."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from benchmarks import fresh_starts


def _report(run: Path, corpus: Path, *extra: str) -> dict[str, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert (
            fresh_starts.main(
                [str(run), "--data", str(corpus / "valid.txt"), "--words", "20", "--json", *extra]
            )
            == 0
        )
    return json.loads(out.getvalue())


def test_columns_and_first_words_are_judged_against_the_threshold(tiny_run: Path, tiny_corpus: Path) -> None:
    report = _report(tiny_run, tiny_corpus)
    (scored,) = report["files"]
    for start in ("zero", "eos"):
        columns = scored[start]["column_perplexities"]
        assert len(columns) == fresh_starts.COLUMNS and all(math.isfinite(p) and p > 1 for p in columns)
        # The split's perplexity is the geometric mean of its columns' (same tokens in each).
        mean = math.exp(sum(math.log(p) for p in columns) / len(columns))
        assert math.isclose(scored[start]["perplexity"], mean, rel_tol=1e-3)
        assert scored[start]["bad_columns"] == [c for c, p in enumerate(columns) if p > 1000]
    assert report["words"] == 20 and all(p > 1000 for _, p in report["spoiled"])

    everything = _report(tiny_run, tiny_corpus, "--bad", "0")
    assert everything["files"][0]["zero"]["bad_columns"] == list(range(fresh_starts.COLUMNS))
    assert len(everything["spoiled"]) == 20  # every first word counts once the bar is 0


def test_a_checkpoint_loads_as_the_last_epochs_weights(tiny_run: Path, tiny_corpus: Path) -> None:
    last = _report(tiny_run, tiny_corpus, "--weights", str(tiny_run / "checkpoint.pt"))
    assert math.isfinite(last["files"][0]["zero"]["perplexity"])
