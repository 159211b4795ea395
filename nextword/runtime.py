"""onnxruntime over a model bundle: the only place the graphs are run.

Used by the server (one call per batch of session steps), by ``nextword eval``
and keystroke savings, and by the exporter's parity check and int8
calibration. State tensors travel as a list ordered like the manifest's state
spec and are bound to graph inputs/outputs by their manifest names, never by
position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from nextword.bundle import Bundle, BundleError

log = logging.getLogger(__name__)

State = list[np.ndarray]


@dataclass
class Ranked:
    """A graph call's answer for a batch: the top-k offerable words, the full log-probs if asked."""

    top_values: np.ndarray | None  # [batch, K] log-probs, best first (None: the graph does not rank)
    top_ids: np.ndarray | None  # [batch, K]
    log_probs: np.ndarray | None  # [batch, vocab], fetched only when needed
    state: State  # the new state (step) or [] (head)


def choose_providers(device: str) -> list[str]:
    """Execution providers for ``auto``/``cpu``/``cuda``; ``cuda`` fails loudly if absent."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "--device cuda: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu on a CUDA machine"
            )
        _preload_cuda()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    if cuda_available():
        _preload_cuda()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cuda_available() -> bool:
    """Whether this onnxruntime has CUDA and the machine a GPU to run it on."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()


def _preload_cuda() -> None:
    # CUDA and cuDNN installed as pip wheels (nvidia-*, beside torch say) are not on the loader's
    # path; onnxruntime-gpu finds and loads them itself (a no-op where the system has them).
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # the CUDA provider's own load error says more, if it comes to that
            log.debug("onnxruntime.preload_dlls: %s", exc)


def _cuda_device_present() -> bool:
    # onnxruntime-gpu lists CUDA even on machines without a GPU; ask the driver.
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


class OnnxLM:
    """A bundle's step and head graphs in onnxruntime sessions."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        threads: int = 0,
        spin: bool = True,
        spin_between_calls: bool = True,
    ) -> None:
        """``threads``: intra-op threads (0: onnxruntime's default, one per core).
        ``spin``: let those threads spin while they wait for work (faster calls; a server whose
        event loops share the cores, several workers, turns it off, so idle threads do not take
        the loops' CPU). ``spin_between_calls`` False: spin within a call only, stopping as it
        returns: a lone server's pool would otherwise hold a core just when the event loop and
        gRPC need it to send the reply (one stream's reply waited about 0.3 ms instead of 0.12)."""
        self.bundle = bundle
        m = bundle.manifest
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif not spin_between_calls:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.inter_op_num_threads = 1
        providers = choose_providers(device)
        try:
            self._step = ort.InferenceSession(str(bundle.step_path), opts, providers=providers)
            self._head = ort.InferenceSession(str(bundle.head_path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{bundle.path}: onnxruntime cannot load the graphs: {exc}") from exc
        self.provider = self._step.get_providers()[0]
        if self.provider != providers[0]:
            # onnxruntime falls back to the CPU quietly when CUDA or cuDNN fails to load
            if device == "cuda":
                raise RuntimeError(
                    f"--device cuda: {providers[0]} did not load (onnxruntime's warning above says why)"
                )
            log.warning("%s did not load; running on %s", providers[0], self.provider)
        self._check_io()
        self.state_spec = m.state
        self._tokens = m.step.inputs[0]
        self._log_probs = m.step.outputs[0]
        self._state_out = [s.output for s in m.state]
        self._top = [m.topk["values"], m.topk["ids"]] if m.topk else []
        self.top_k = int(m.topk["k"]) if m.topk else 0
        self._head_in = [i for i, s in enumerate(m.state) if s.input in m.head.inputs]
        log.info("loaded %s (%s) with %s", m.name, m.cell, self.provider)

    def _check_io(self) -> None:
        m = self.bundle.manifest
        for sess, graph in ((self._step, m.step), (self._head, m.head)):
            ins = {i.name for i in sess.get_inputs()}
            outs = {o.name for o in sess.get_outputs()}
            if not set(graph.inputs) <= ins or not set(graph.outputs) <= outs:
                raise BundleError(
                    f"{self.bundle.path}: {graph.file} has inputs {sorted(ins)} and outputs {sorted(outs)}, "
                    f"but the manifest names {graph.inputs} -> {graph.outputs}"
                )

    @property
    def vocab_size(self) -> int:
        return len(self.bundle.vocab)

    def zero_state(self, batch: int) -> State:
        return [np.zeros(s.concrete_shape(batch), dtype=np.dtype(s.dtype)) for s in self.state_spec]

    def start(self) -> tuple[np.ndarray, State]:
        """Where every context starts: next-word log-probs [1, vocab] and the state, after one ``<eos>``.

        Training text follows an ``<eos>``, so a new or reset session, a one-shot
        prediction and an offline keystroke simulation all begin here.
        """
        eos = np.array([[self.bundle.vocab.eos_id]], dtype=np.int64)
        return self.step(eos, self.zero_state(1))

    def start_state(self) -> State:
        """The state of ``start`` alone (batch of one)."""
        return self.start()[1]

    def _step_feeds(self, tokens: np.ndarray, state: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {self._tokens: np.ascontiguousarray(tokens, dtype=np.int64)}
        for spec, value in zip(self.state_spec, state, strict=True):
            feeds[spec.input] = value
        return feeds

    def step(self, tokens: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, State]:
        """Run ``tokens`` [batch, seq] from ``state``: next-word log-probs [batch, vocab], new state."""
        outputs = self._step.run([self._log_probs, *self._state_out], self._step_feeds(tokens, state))
        return outputs[0], outputs[1:]

    def head(self, state: Sequence[np.ndarray]) -> np.ndarray:
        """Next-word log-probs [batch, vocab] read from a state, with no new token."""
        return self._head.run([self._log_probs], self._head_feeds(state))[0]

    def step_ranked(
        self, tokens: np.ndarray, state: Sequence[np.ndarray], *, whole_distribution: bool
    ) -> Ranked:
        """Like ``step``, fetching the in-graph top-k, and all log-probs only with ``whole_distribution``."""
        names = [*self._state_out, *self._top, *self._log_probs_if(whole_distribution)]
        outputs = self._step.run(names, self._step_feeds(tokens, state))
        n = len(self._state_out)
        return self._ranked(outputs[n:], outputs[:n])

    def head_ranked(self, state: Sequence[np.ndarray], *, whole_distribution: bool) -> Ranked:
        """Like ``head``, fetching the in-graph top-k, and all log-probs only with ``whole_distribution``."""
        names = [*self._top, *self._log_probs_if(whole_distribution)]
        return self._ranked(self._head.run(names, self._head_feeds(state)), [])

    def _log_probs_if(self, whole_distribution: bool) -> list[str]:
        # A graph without in-graph ranking has nothing else to give.
        return [self._log_probs] if whole_distribution or not self._top else []

    def _ranked(self, outputs: list[np.ndarray], state: State) -> Ranked:
        if self._top:
            return Ranked(outputs[0], outputs[1], outputs[2] if len(outputs) > 2 else None, state)
        return Ranked(None, None, outputs[0], state)

    def _head_feeds(self, state: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {self.state_spec[i].input: state[i] for i in self._head_in}
