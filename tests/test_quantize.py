"""int8 bundles: calibrated static scales, so a user's answer never depends on who shares the batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nextword.bundle import load_bundle
from nextword.export.quantize import quantize_bundle
from tests.test_server import assert_same, serving, type_words


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    quantize_bundle(tiny_bundle, out, calibration=tiny_corpus)
    return out


def test_int8_bundle_is_valid_and_scored(int8_bundle: Path, tiny_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    m = bundle.manifest
    assert m.name == "tiny-int8" and "int8" in m.export["quantization"]["type"]
    assert "weights.bin" not in m.files  # self-contained graphs
    assert m.state == load_bundle(tiny_bundle).manifest.state
    step = (int8_bundle / m.step.file).read_bytes()
    assert b"QGemm" in step or b"QLinearMatMul" in step or b"MatMulInteger" in step
    # Quantization costs a little perplexity, not a lot.
    assert abs(m.metrics["test_perplexity_change"]) < 0.05


@pytest.mark.asyncio(loop_scope="session")
async def test_int8_answers_do_not_depend_on_the_batch(int8_bundle: Path) -> None:
    texts = [
        "the cat sat on the mat. ",
        "a dog ran past my house, and ",
        "her old king spoke to ",
        "emma ",
        "x y z ",
    ]
    pieces = [[w + " " for w in text.split()] for text in texts]
    async with serving(int8_bundle) as (_, stub):
        alone = [await type_words(stub, words) for words in pieces]
        together = await asyncio.gather(*(type_words(stub, words) for words in pieces))
    for a, t in zip(alone, together, strict=True):
        for x, y in zip(a, t, strict=True):
            assert_same(x.prediction, y.prediction)


def test_quantize_cli_refuses_too_little_text(tiny_bundle: Path, tmp_path: Path) -> None:
    from nextword.cli import main

    (tmp_path / "short.txt").write_text("too short\n")
    assert (
        main(
            [
                "quantize",
                str(tiny_bundle),
                "--out",
                str(tmp_path / "q"),
                "--data",
                str(tmp_path / "short.txt"),
            ]
        )
        == 2
    )
