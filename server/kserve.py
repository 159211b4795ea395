"""The KServe v2 / Open Inference Protocol over gRPC (``inference.GRPCInferenceService``).

Triton's clients (tritonclient, perf_analyzer, Model Analyzer) and other KServe v2 clients
talk to nextword on the same port as ``nextword.v1``. The model takes one input and gives
five outputs:

* ``TEXT`` (BYTES, one element): the text typed since the last request;
* ``WORDS`` / ``PROBS`` (BYTES / FP32, k each): the next-word suggestions;
* ``COMPLETIONS`` / ``COMPLETION_PROBS``: completions of the word being typed (empty
  between words), and ``PARTIAL`` (BYTES, one element): that unfinished word.

``k`` is the request parameter ``k`` (default: the server's). Triton's sequence controls map
onto nextword sessions: requests with the same ``sequence_id`` (a number or a string) are
one session, begun by ``sequence_start`` and ended by ``sequence_end``; its state stays on
the server between requests, so each costs one model step, exactly as a ``Session``
stream's do (and answers the same). A request with no ``sequence_id`` is a ``Predict``.
Sequences belong to the caller's principal: another caller's ``sequence_id`` is unknown to
it. With a model repository (``--model-repository``) its calls index, load and unload models
(load and unload with ``--model-control explicit`` only, as in Triton). The messages come
from ``protos/inference/grpc_service.proto``, loaded into a pool of
their own (see the proto).
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor

from nextword.v1 import nextword_pb2 as pb

from .model import ModelVersion
from .repository import ModelLoadError, ModelNotFound
from .security import PRINCIPAL
from .service import NextWordServicer
from .session import Stream

DESCRIPTOR_SET = Path(__file__).resolve().parents[1] / "nextword" / "kserve" / "grpc_service.desc"
SERVICE_NAME = "inference.GRPCInferenceService"
MAX_SEQUENCES = 100_000  # sequence ids remembered per server (the session table bounds the sessions)
# The model's outputs: name, KServe datatype, shape (-1: as many as there are). Metadata, the model
# configuration and every answer read this one list.
OUTPUTS = (
    ("WORDS", "BYTES", -1),
    ("PROBS", "FP32", -1),
    ("COMPLETIONS", "BYTES", -1),
    ("COMPLETION_PROBS", "FP32", -1),
    ("PARTIAL", "BYTES", 1),
)
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}  # KServe's datatype names in Triton's config


def _service() -> ServiceDescriptor:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool.FindServiceByName(SERVICE_NAME)


SERVICE = _service()


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(SERVICE.file.pool.FindMessageTypeByName(f"inference.{name}"))


class Invalid(Exception):
    """A request this protocol's rules refuse; the message says what to send instead."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's raw BYTES layout: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


Tensor = tuple[int, bytes]  # an output's element count and raw contents (its datatype: OUTPUTS)


def _words(suggestions: Any) -> Tensor:
    return len(suggestions), _bytes_tensor([s.word.encode() for s in suggestions])


def _probs(suggestions: Any) -> Tensor:
    return len(suggestions), struct.pack(f"<{len(suggestions)}f", *(s.prob for s in suggestions))


def _first_bytes(raw: bytes) -> bytes:
    """The only element of a raw BYTES tensor of one element; Invalid otherwise."""
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
        raise Invalid(grpc.StatusCode.INVALID_ARGUMENT, "input TEXT: one BYTES element of the text typed")
    return raw[4:]


def _sequence_key(request: Any) -> tuple[str, str] | None:
    """The caller's sequence this request belongs to (Triton's ``sequence_id``), if any."""
    sequence = _parameter(request, "sequence_id")
    return None if sequence in (None, 0, "") else (PRINCIPAL.get(), str(sequence))


def _parameter(request: Any, name: str) -> Any:
    """A request parameter's value (whichever of its kinds was sent), or None."""
    if name not in request.parameters:
        return None
    param = request.parameters[name]
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def _statistics(model: ModelVersion) -> Any:
    """KServe's ``ModelStatistics`` of one version, every worker's counts summed (server/stats.py)."""
    stats, took = model.stats.totals(), _message("StatisticDuration")
    batch = _message("InferBatchStatistics")
    return _message("ModelStatistics")(
        name=model.name,
        version=model.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.success.count,
        execution_count=stats.executions,
        inference_stats=_message("InferStatistics")(
            success=took(count=stats.success.count, ns=stats.success.ns),
            fail=took(count=stats.fail.count, ns=stats.fail.ns),
            queue=took(count=stats.queue.count, ns=stats.queue.ns),
            compute_infer=took(count=stats.compute.count, ns=stats.compute.ns),
        ),
        batch_stats=[
            batch(batch_size=size, compute_infer=took(count=d.count, ns=d.ns))
            for size, d in sorted(stats.batches.items())
        ],
    )


class _OneRequest:
    """A stream's context as one of its requests sees it: a refusal of the request (the NextWord
    servicer's ``abort``: a limit, an unknown session) becomes that request's ``error_message``,
    and the stream, with its other sequences, goes on."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> NoReturn:
        raise Invalid(code, details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class KServeServicer:
    """``inference.GRPCInferenceService`` answered by the NextWord servicer's own session steps."""

    def __init__(
        self,
        nextword: NextWordServicer,
        idle_s: float,
        *,
        explicit: bool = False,
        controllers: frozenset[str] = frozenset(),
    ) -> None:
        self._nextword = nextword
        self._models = nextword.models
        self._explicit = explicit  # --model-control explicit: RepositoryModelLoad/Unload allowed
        self._controllers = controllers  # ... to these principals (ServerConfig.controllers)
        self._idle_s = idle_s  # how long a sequence's session is kept between requests (--session-ttl)
        self._sequences: OrderedDict[tuple[str, str], str] = OrderedDict()  # (principal, id) -> session
        self._response = _message("ModelInferResponse")
        self._stream_response = _message("ModelStreamInferResponse")
        self._tensor = _message("ModelMetadataResponse.TensorMetadata")

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _message("ServerLiveResponse")(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _message("ServerReadyResponse")(ready=not self._nextword.draining)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ready = self._find(request.name, request.version) is not None and not self._nextword.draining
        return _message("ModelReadyResponse")(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            release = version("nextword")
        except PackageNotFoundError:
            release = "unknown"
        return _message("ServerMetadataResponse")(
            name="nextword", version=release, extensions=["sequence", "statistics", "model_repository"]
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        model = await self._model(request.name, request.version, context)
        t = self._tensor
        return _message("ModelMetadataResponse")(
            name=model.name,
            versions=[v.version for v in self._models.ready(model.name)],
            platform="nextword",
            inputs=[t(name="TEXT", datatype="BYTES", shape=[1])],
            outputs=[t(name=name, datatype=datatype, shape=[size]) for name, datatype, size in OUTPUTS],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's model configuration, as perf_analyzer reads it: a sequence model, no batch axis."""
        model = await self._model(request.name, request.version, context)
        types = SERVICE.file.pool.FindEnumTypeByName("inference.DataType").values_by_name
        out = _message("ModelOutput")
        config = _message("ModelConfig")(
            name=model.name,
            platform="nextword",
            backend="nextword",
            max_batch_size=0,
            input=[_message("ModelInput")(name="TEXT", data_type=types["TYPE_STRING"].number, dims=[1])],
            output=[
                out(name=name, data_type=types[CONFIG_TYPES[datatype]].number, dims=[size])
                for name, datatype, size in OUTPUTS
            ],
            sequence_batching=_message("ModelSequenceBatching")(
                max_sequence_idle_microseconds=round(self._idle_s * 1e6)
            ),
        )
        return _message("ModelConfigResponse")(config=config)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        held = await self._nextword.hold(context)
        try:
            return await self._infer(request, context, held)
        except Invalid as exc:
            await context.abort(exc.code, str(exc))
        finally:
            self._nextword.release(held)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Requests run as they arrive, side by side (so the steps of different sequences share
        model calls, as Triton's clients expect of one stream carrying many), each sequence's in
        its order; answers go out as they are ready, each naming its request's ``id``. One
        refused gets an error_message, and the stream goes on."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        last: dict[tuple[str, str], asyncio.Task[None]] = {}  # each sequence's latest request
        running: set[asyncio.Task[None]] = set()
        open_sequences: set[tuple[str, str]] = set()  # begun on this stream and not ended
        own = cast(grpc.aio.ServicerContext, _OneRequest(context))  # refusals answer one request

        async def answer(request: Any, after: asyncio.Task[None] | None) -> None:
            if after is not None:
                await asyncio.wait([after])  # the sequence's previous request first
            try:
                response = await self._infer(request, own, held)
                await answers.put(self._stream_response(infer_response=response))
            except Invalid as exc:
                await answers.put(self._stream_response(error_message=f"{exc.code.name}: {exc}"))
            except BaseException as exc:  # the call is ending (an abort, a cancel): say so below
                await answers.put(exc)

        def finished(key: tuple[str, str] | None, task: asyncio.Task[None]) -> None:
            running.discard(task)
            if key is not None and last.get(key) is task:
                del last[key]  # the sequence has nothing in flight on this stream

        async def read() -> None:
            async for request in requests:
                key = _sequence_key(request)
                if key is not None:
                    if _parameter(request, "sequence_end"):
                        open_sequences.discard(key)
                    else:
                        open_sequences.add(key)
                held.shared = len(open_sequences) > 1
                task = asyncio.ensure_future(answer(request, last.get(key) if key else None))
                running.add(task)
                task.add_done_callback(functools.partial(finished, key))
                if key is not None:
                    last[key] = task
            if running:
                await asyncio.wait(running)
            await answers.put(None)

        held = await self._nextword.hold(context)  # one open stream, whatever it carries
        reader = asyncio.ensure_future(read())
        try:
            while (item := await answers.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            await reader  # its own failure, if any
        finally:
            for task in [reader, *running]:
                task.cancel()
            self._nextword.release(held)

    # ---- the model repository (Triton's extension) ---------------------------------------
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        entry = _message("RepositoryIndexResponse.ModelIndex")
        rows = [
            entry(name=name, version=version, state=state, reason=reason)
            for name, version, state, reason in self._models.index()
            if state == "READY" or not request.ready
        ]
        return _message("RepositoryIndexResponse")(models=rows)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._may_control(context, "load")
        try:
            await self._models.load(request.model_name)
        except ModelLoadError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return _message("RepositoryModelLoadResponse")()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._may_control(context, "unload")
        try:
            self._models.unload(request.model_name)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return _message("RepositoryModelUnloadResponse")()

    async def _may_control(self, context: grpc.aio.ServicerContext, what: str) -> None:
        if self._models.root is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server serves one bundle (--model), not a repository: nothing to {what} "
                "(start it with --model-repository DIR)",
            )
        if not self._explicit:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"explicit model {what} is not allowed while the repository is polled: the server "
                "loads what DIR holds by itself (--model-control explicit loads and unloads by call)",
            )
        if (principal := PRINCIPAL.get()) not in self._controllers:
            # Loading and unloading reach every caller's sessions: not for whoever may predict.
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal[:16]} may not {what} models on this server: its operator names who may "
                "with --control-principals",
            )

    # ---- statistics (Triton's extension) -----------------------------------------------
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every loaded version's (those still finishing sessions too), or those of ``name``."""
        models = sorted((v for v in self._models.versions.values() if not v.closed), key=lambda v: v.key)
        if request.name:
            models = [v for v in models if v.name == request.name and request.version in ("", v.version)]
            if not models:
                await self._model(request.name, request.version, context)  # NOT_FOUND, saying what is served
        return _message("ModelStatisticsResponse")(model_stats=[_statistics(v) for v in models])

    # ---- one inference ------------------------------------------------------------------
    async def _infer(self, request: Any, context: grpc.aio.ServicerContext, held: Stream) -> Any:
        text = self._text(request)
        k = _parameter(request, "k")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise Invalid(grpc.StatusCode.INVALID_ARGUMENT, 'parameter "k" must be a whole number, 0 or more')
        key = _sequence_key(request)
        # The NextWord servicer judges the model: NOT_FOUND for one it does not serve, and a
        # sequence's session keeps the version it began on (INVALID_ARGUMENT for another).
        name, wanted = request.model_name, request.model_version
        if key is None:
            ask = pb.PredictRequest(text=text, k=k or 0, model=name, model_version=wanted)
            answer = await self._nextword.Predict(ask, context)
            return self._answer(request, answer.prediction, answer.model_version)
        step = pb.SessionRequest(text=text, k=k or 0, model=name, model_version=wanted)
        reply = await self._sequence_step(context, key, step, request, held)
        return self._answer(request, reply.prediction, reply.model_version)

    async def _sequence_step(
        self,
        context: grpc.aio.ServicerContext,
        key: tuple[str, str],
        ask: pb.SessionRequest,
        request: Any,
        held: Stream,
    ) -> pb.SessionReply:
        start, end = bool(_parameter(request, "sequence_start")), bool(_parameter(request, "sequence_end"))
        if start:
            self._drop(key)
        elif key not in self._sequences:
            raise Invalid(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sequence {key[1]} was not started: send sequence_start=true on its first request",
            )
        reply = await self._nextword.step(context, self._sequences.get(key, ""), ask, held=held)
        # A session that has read nothing yet is not kept (server/session.py: detach); the
        # sequence then starts its session with its first text, as a new Session stream would.
        self._sequences[key] = reply.session_id if self._nextword.holds(reply.session_id) else ""
        self._sequences.move_to_end(key)
        while len(self._sequences) > MAX_SEQUENCES:
            self._sequences.popitem(last=False)
        if end:
            self._drop(key)
        return reply

    def _drop(self, key: tuple[str, str]) -> None:
        if (session_id := self._sequences.pop(key, None)) is not None:
            self._nextword.forget(session_id)

    def _text(self, request: Any) -> str:
        names = [t.name for t in request.inputs]
        if names != ["TEXT"]:
            raise Invalid(
                grpc.StatusCode.INVALID_ARGUMENT, f"inputs {names}: this model takes one, TEXT (BYTES)"
            )
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES" or list(tensor.shape) not in ([1], [1, 1]):
            raise Invalid(grpc.StatusCode.INVALID_ARGUMENT, "input TEXT: datatype BYTES, shape [1]")
        if request.raw_input_contents:
            data = _first_bytes(request.raw_input_contents[0])
        elif len(tensor.contents.bytes_contents) == 1:
            data = tensor.contents.bytes_contents[0]
        else:
            raise Invalid(grpc.StatusCode.INVALID_ARGUMENT, "input TEXT: one BYTES element of the text typed")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid(
                grpc.StatusCode.INVALID_ARGUMENT, f"input TEXT is not UTF-8 ({exc.reason})"
            ) from exc

    def _answer(self, request: Any, p: pb.Prediction, model_version: str) -> Any:
        names = [name for name, _, _ in OUTPUTS]
        wanted = [o.name for o in request.outputs] or names
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise Invalid(
                grpc.StatusCode.INVALID_ARGUMENT, f"outputs {unknown} unknown; this model gives {names}"
            )
        contents = {
            "WORDS": _words(p.suggestions),
            "PROBS": _probs(p.suggestions),
            "COMPLETIONS": _words(p.completions),
            "COMPLETION_PROBS": _probs(p.completions),
            "PARTIAL": (1, _bytes_tensor([p.partial.encode()])),
        }
        served = request.model_name or self._models.default_name
        response = self._response(model_name=served, model_version=model_version, id=request.id)
        datatypes = {name: datatype for name, datatype, _ in OUTPUTS}
        for name in wanted:
            size, raw = contents[name]
            response.outputs.add(name=name, datatype=datatypes[name], shape=[size])
            response.raw_output_contents.append(raw)
        return response

    def _find(self, name: str, model_version: str) -> ModelVersion | None:
        try:
            return self._models.pick(name, model_version)
        except ModelNotFound:
            return None

    async def _model(self, name: str, model_version: str, context: grpc.aio.ServicerContext) -> ModelVersion:
        try:
            return self._models.pick(name, model_version)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
