"""The ``nextword`` command: one table of sub-commands, each run by the side it belongs to.

Every sub-command declares its options on a configuration dataclass (see
``nextword.options``) and runs from a ``main(args)`` function; both are named
here by module path and imported only for the command being run, so serving
never loads torch, a client never loads onnxruntime, and ``nextword train
--help`` works without the training extra installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass

from nextword import __version__
from nextword.options import HelpFormatter, add_options


@dataclass(frozen=True)
class Command:
    help: str
    run: str  # "module:function" called with the parsed arguments
    options: tuple[str, ...]  # "module:Class", dataclasses whose fields are the options
    extra: str = ""  # the optional dependency group the command needs, if any
    needs: tuple[str, ...] = ()  # the modules that group provides

    def describe(self) -> str:
        if not self.extra:
            return self.help
        return f"{self.help} (needs the {self.extra} extra: pip install 'nextword[{self.extra}]')"

    def missing(self) -> list[str]:
        return [name for name in self.needs if importlib.util.find_spec(name) is None]


_TRAIN = ("torch", "onnx")
_CONNECTION = "nextword.clients.connection:ConnectionOptions"  # target, TLS, token: every client command
COMMANDS = {
    "serve": Command(
        "serve a model bundle over gRPC",
        "nextword.server.main:main",
        ("nextword.server.config:ServerConfig",),
    ),
    "token": Command(
        "make a bearer token for serve's --tokens-file (printed once; the file keeps its digest)",
        "nextword.server.tokens:main",
        ("nextword.server.tokens:TokenOptions",),
    ),
    "predict": Command(
        "ask a running server for next-word suggestions (end the text with a space) or completions",
        "nextword.clients.predict:main",
        ("nextword.clients.predict:PredictOptions", _CONNECTION),
    ),
    "complete": Command(
        "interactive autocomplete in the terminal against a running server",
        "nextword.clients.autocomplete:main",
        ("nextword.clients.autocomplete:CompleteOptions", _CONNECTION),
    ),
    "loadtest": Command(
        "many concurrent sessions against a running server: words/s and latency percentiles",
        "nextword.clients.loadtest.cli:main",
        ("nextword.clients.loadtest.cli:LoadTestOptions", _CONNECTION),
    ),
    "gateway": Command(
        "the browser's way in: HTTP/JSON, a WebSocket per session and a demo page, in front of a server",
        "nextword.clients.gateway:main",
        ("nextword.clients.gateway:GatewayOptions", _CONNECTION),
        extra="web",
        needs=("aiohttp",),
    ),
    "eval": Command(
        "perplexity, top-1/top-3 accuracy and keystroke savings (--ksr) of a bundle on a text file",
        "nextword.evaluate:main",
        ("nextword.evaluate:EvalOptions",),
    ),
    "train": Command(
        "train a recurrent language model",
        "nextword.export.train:main",
        ("nextword.export.config:TrainConfig", "nextword.export.config:ModelConfig"),
        extra="train",
        needs=_TRAIN,
    ),
    "export": Command(
        "export a trained run to an ONNX model bundle",
        "nextword.export.onnx_export:main",
        ("nextword.export.config:ExportConfig",),
        extra="train",
        needs=_TRAIN,
    ),
    "quantize": Command(
        "an int8 (CPU) or fp16 (CUDA) bundle from an fp32 one (int8: calibrated, batch-independent scales)",
        "nextword.export.quantize:main",
        ("nextword.export.config:QuantizeConfig",),
        extra="quantize",
        needs=("onnx",),
    ),
    "diagnose": Command(
        "plot how the loss gradient vanishes back through time, per cell or run",
        "nextword.export.diagnose:main",
        ("nextword.export.config:DiagnoseConfig",),
        extra="train",
        needs=("torch", "matplotlib"),
    ),
}


def _resolve(path: str) -> object:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s options are declared (importing just what declares them)."""
    parser = argparse.ArgumentParser(
        prog="nextword", description="Streaming next-word prediction with recurrent language models."
    )
    parser.add_argument("--version", action="version", version=f"nextword {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name, help=cmd.describe(), description=cmd.describe(), formatter_class=HelpFormatter
        )
        if name == command:
            add_options(p, *(_resolve(path) for path in cmd.options))  # type: ignore[arg-type]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = next((a for a in argv if not a.startswith("-")), None)
    command = COMMANDS.get(name) if name else None
    if command is not None and (missing := command.missing()) and not {"-h", "--help"} & set(argv):
        print(
            f"nextword {name}: error: {' and '.join(missing)} not installed; this command needs "
            f"the {command.extra} extra: pip install 'nextword[{command.extra}]'",
            file=sys.stderr,
        )
        return 2
    args = build_parser(name if command else None).parse_args(argv)
    args.argv = argv  # recorded in bundles/runs as the command that made them
    run = _resolve(COMMANDS[args.command].run)
    return int(run(args) or 0)  # type: ignore[operator]


if __name__ == "__main__":
    sys.exit(main())
