"""The ``nextword`` command. Arguments are declared here; each command's module
is imported only when it runs, so serving and client commands never load torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_TARGET = "127.0.0.1:50051"
# The committed demo bundle: next to the package in a source checkout (pip install -e .),
# else ./models/demo relative to where the server is started.
_CHECKOUT_DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
DEMO_MODEL = _CHECKOUT_DEMO if _CHECKOUT_DEMO.is_dir() else Path("models") / "demo"


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="directory with train.txt and valid.txt (test.txt optional)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, vocab, metrics)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument(
        "--format",
        choices=["auto", "raw", "lines"],
        default="auto",
        help="raw: wrapped text, blank line = paragraph end; lines: one tokenized sentence a line",
    )
    p.add_argument(
        "--cell",
        default="lstm",
        choices=["rnn", "irnn", "delay", "lstm", "gru", "cifg"],
        help="recurrent cell (see export/model.py)",
    )
    p.add_argument("--delay", type=int, default=4, help="delay cell: skip connection from h(t-d)")
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--min-count", type=int, default=2)
    p.add_argument("--embedding-dim", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--no-tie", dest="tie", action="store_false", help="separate input and output embeddings")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35, help="truncated BPTT length (tokens)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold; 0 disables")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this much training time (0: no limit); the best checkpoint is kept",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a training run directory (nextword train --out)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", help="model name (default: the bundle directory's name)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--top-k", type=int, default=64, help="rank this many words inside the graphs (0: the server ranks)"
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |torch - onnxruntime| allowed")
    p.add_argument(
        "--eval-data",
        type=Path,
        help="directory whose valid.txt/test.txt are scored into the manifest"
        " (default: the training data directory)",
    )


def _quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="an fp32 bundle")
    p.add_argument("--out", type=Path, required=True, help="int8 bundle directory to write")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="calibration text: a file, or a directory (valid.txt calibrates; valid/test.txt are scored)",
    )


def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, default=DEMO_MODEL, help="bundle directory (default: the demo model)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9100, help="Prometheus /metrics port (0: off)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-sessions", type=int, default=100_000)
    p.add_argument("--session-ttl", type=float, default=600.0, help="seconds an idle session is kept")
    p.add_argument("--max-text-chars", type=int, default=4096, help="longest text increment accepted")
    p.add_argument("--max-k", type=int, default=50)
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain streams on SIGTERM")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--max-batch", type=int, default=64, help="most session steps in one onnxruntime call")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=0.5,
        help="how long a lone step waits for others to share its call (0: never waits)",
    )
    p.add_argument("--log-level", default="info")


def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("text")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=10.0)


def _complete(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT")
    p.add_argument("--k", type=int, default=5, help="suggestions shown")


def _loadtest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT; loopback only")
    p.add_argument("--streams", type=int, default=8, help="concurrent sessions (one stream each)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, help="seconds to run (default 10)")
    stop.add_argument("--words", type=int, help="stop after this many words in all")
    p.add_argument("--rate", type=float, help="words/s per stream, open loop (default: closed loop)")
    p.add_argument("--context-words", type=int, default=0, help="words sent in one request before measuring")
    p.add_argument("--text", type=Path, help="text to type (default: the Gutenberg test split, if present)")
    p.add_argument("--k", type=int, default=3, help="suggestions asked for")
    p.add_argument("--procs", type=int, default=1, help="client processes the streams are spread over")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not loopback")


def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="text file to score")
    p.add_argument("--format", choices=["auto", "raw", "lines"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--ksr", action="store_true", help="also simulate typing: keystroke savings")
    p.add_argument("--ksr-chars", type=int, default=20000, help="keystroke savings: first N characters")
    p.add_argument("--slots", type=int, default=3, help="keystroke savings: suggestions shown")


def _diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--cells", help="also fresh-initialised models of these cells, e.g. rnn,lstm")
    p.add_argument("--out", type=Path, default=Path("grad.png"), help="PNG to write")
    p.add_argument("--json", action="store_true", help="print one JSON object with the norms")
    p.add_argument("--horizon", "-K", type=int, default=100, help="largest k (steps back)")
    p.add_argument("--sequences", type=int, default=8, help="sequences averaged over")
    p.add_argument("--warmup", type=int, default=50, help="steps run before T-K, without gradient")
    p.add_argument("--data", type=Path, help="text file: real token windows instead of random ids")
    p.add_argument("--format", choices=["auto", "raw", "lines"], default="auto")
    p.add_argument("--hidden-size", type=int, default=256, help="fresh models")
    p.add_argument("--layers", type=int, default=1, help="fresh models")
    p.add_argument("--vocab-size", type=int, default=10000, help="fresh models")
    p.add_argument("--delay", type=int, default=4, help="fresh delay cell: skip connection from h(t-d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


# command -> (help, argument declarer, "module:function" that runs it)
COMMANDS = {
    "train": ("train a recurrent language model (needs torch)", _train, "export.train:main"),
    "export": (
        "export a trained run to an ONNX model bundle (needs torch)",
        _export,
        "export.onnx_export:main",
    ),
    "diagnose": (
        "plot how the loss gradient vanishes back through time, per cell or run (needs torch)",
        _diagnose,
        "export.diagnose:main",
    ),
    "quantize": (
        "an int8 bundle from an fp32 one, with calibrated (batch-independent) scales",
        _quantize,
        "export.quantize:main",
    ),
    "serve": ("serve a model bundle over gRPC", _serve, "server.app:main"),
    "predict": ("ask a running server for next-word suggestions", _predict, "clients.cli:predict"),
    "complete": (
        "interactive autocomplete in the terminal against a running server",
        _complete,
        "clients.autocomplete:main",
    ),
    "loadtest": (
        "many concurrent sessions against a running server: words/s and latency percentiles",
        _loadtest,
        "clients.loadtest:main",
    ),
    "eval": (
        "perplexity, top-1/top-3 accuracy (and --ksr keystroke savings) of a bundle on a text file",
        _eval,
        "clients.evaluate:main",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextword", description="Streaming next-word prediction with recurrent language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, declare, _) in COMMANDS.items():
        declare(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in bundles/runs as the command that made them
    module_name, func_name = COMMANDS[args.command][2].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
