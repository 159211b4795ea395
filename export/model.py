"""Word-level recurrent language models: embedding -> recurrent stack -> tied softmax.

The lecture's whole recurrent family, behind one interface (``Recurrent``):

* ``rnn``   vanilla tanh RNN.
* ``irnn``  ReLU RNN, recurrent matrix initialised to the identity and small input
  weights (Le, Jaitly & Hinton 2015): at init the state is carried unchanged, so
  gradients neither vanish nor explode along the identity path.
* ``delay`` tanh RNN with a skip connection across time: h_t sees h_{t-1} and
  h_{t-d}, so a gradient crosses t steps in about t/d multiplications. Its state
  is the last d hidden states of every layer.
* ``lstm``  forget/input/output gates and a cell state (Hochreiter & Schmidhuber 1997).
* ``gru``   update and reset gates, no separate cell state (Cho et al. 2014).
* ``cifg``  LSTM with the input gate coupled to the forget gate (i = 1 - f), as
  mobile keyboards use: a quarter fewer recurrent weights.

``rnn``/``irnn``/``lstm``/``gru`` use torch's fused layers (ONNX RNN/LSTM/GRU ops);
``delay`` and ``cifg`` are TorchScript loops, which export to an ONNX ``Loop`` with a
dynamic sequence length. Every cell's state is a tuple of named tensors whose
batch axis is 1; the first tensor holds the hidden state the next word is read
from. ``StepGraph``/``HeadGraph`` are the views the exporter turns into the
bundle's two graphs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .config import CELLS as CELLS  # re-exported: the cells this module builds
from .config import ModelConfig

State = tuple[Tensor, ...]


# ---- recurrent stacks ---------------------------------------------------------------
class Recurrent(nn.Module):
    """A stack of recurrent layers over [batch, seq, input] with an explicit state."""

    state_names: tuple[str, ...] = ("h",)

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        raise NotImplementedError

    def top_hidden(self, first_state: Tensor) -> Tensor:
        """The last layer's newest hidden state [batch, hidden], from the first state tensor."""
        return first_state[-1]


class FusedRecurrent(Recurrent):
    """torch's nn.RNN/nn.GRU/nn.LSTM: rnn, irnn, gru, lstm."""

    def __init__(
        self, cell: str, input_size: int, hidden: int, layers: int, dropout: float, irnn_scale: float = 1.0
    ) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {"dropout": dropout if layers > 1 else 0.0, "batch_first": True}
        if cell in ("rnn", "irnn"):
            self.rnn: nn.RNNBase = nn.RNN(
                input_size, hidden, layers, nonlinearity="relu" if cell == "irnn" else "tanh", **kwargs
            )
        else:
            self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](input_size, hidden, layers, **kwargs)
        self.state_names = ("h", "c") if cell == "lstm" else ("h",)
        self.layers, self.hidden = layers, hidden
        if cell == "irnn":
            for name, param in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    nn.init.eye_(param)  # carry the state forward unchanged at init (or decaying)
                    param.data.mul_(irnn_scale)
                elif name.startswith("weight_ih"):
                    nn.init.normal_(param, std=1e-3)  # Le et al.: small input weights
                else:
                    nn.init.zeros_(param)
        if cell == "lstm":
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    param.data[hidden : 2 * hidden].fill_(1.0)  # forget bias 1 (Jozefowicz et al. 2015)

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        return tuple(torch.zeros(self.layers, batch, self.hidden, device=device) for _ in self.state_names)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        out, new = self.rnn(x, state if len(state) == 2 else state[0])
        return out, tuple(new) if isinstance(new, tuple) else (new,)


def _cifg_scan(xs: Tensor, h: Tensor, c: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CIFG over a sequence; ``xs`` holds the input projections [batch, seq, 3*hidden]."""
    outs: list[Tensor] = []
    for t in range(xs.size(1)):
        f, o, g = (xs[:, t] + torch.mm(h, w_hh.t())).chunk(3, 1)
        f = torch.sigmoid(f)
        c = f * c + (1.0 - f) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1), h, c


def _delay_scan(xs: Tensor, buf: Tensor, w_hh: Tensor, w_hd: Tensor) -> tuple[Tensor, Tensor]:
    """Delay-d tanh RNN over a sequence; ``buf`` [batch, d, hidden] is h_{t-d} .. h_{t-1}."""
    outs: list[Tensor] = []
    for t in range(xs.size(1)):
        h = torch.tanh(xs[:, t] + torch.mm(buf[:, -1], w_hh.t()) + torch.mm(buf[:, 0], w_hd.t()))
        buf = torch.cat([buf[:, 1:], h.unsqueeze(1)], 1)
        outs.append(h)
    return torch.stack(outs, 1), buf


# Training runs the loops eagerly (TorchScript's profiling executor re-specialises on every
# new sequence length, which costs more than it saves here); export traces the scripted
# twins, which become an ONNX Loop over a dynamic sequence length.
# torch.jit.script is deprecated, but it is still the exporter's only route from a Python
# loop to an ONNX Loop with a dynamic trip count.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _SCRIPTED = {f: torch.jit.script(f) for f in (_cifg_scan, _delay_scan)}


def _scan(f):  # type: ignore[no-untyped-def]
    return _SCRIPTED[f] if torch.jit.is_tracing() else f


class CIFGLayer(nn.Module):
    """One CIFG-LSTM layer: c = f*c + (1-f)*g, h = o*tanh(c)."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden, bias=False)
        with torch.no_grad():
            self.ih.bias[:hidden].fill_(1.0)  # forget bias 1: remember by default

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The input projections of all steps in one matmul; the scripted loop does the rest.
        return _scan(_cifg_scan)(self.ih(x), h, c, self.hh.weight)


class DelayLayer(nn.Module):
    """One delay-d tanh RNN layer: h_t = tanh(W x_t + U h_{t-1} + V h_{t-d} + b)."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, hidden)
        self.hh = nn.Linear(hidden, hidden, bias=False)
        self.hd = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
        return _scan(_delay_scan)(self.ih(x), buf, self.hh.weight, self.hd.weight)


class ScriptedRecurrent(Recurrent):
    """A stack of layers whose time loop is TorchScript (cifg, delay); states stacked over layers."""

    def __init__(
        self, cell: str, input_size: int, hidden: int, layers: int, dropout: float, delay: int
    ) -> None:
        super().__init__()
        self.cell, self.hidden, self.delay = cell, hidden, delay
        self.state_names = ("h", "c") if cell == "cifg" else ("h",)
        make = CIFGLayer if cell == "cifg" else DelayLayer
        self.layers = nn.ModuleList([make(input_size if i == 0 else hidden, hidden) for i in range(layers)])
        self.drop = nn.Dropout(dropout)

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        n = len(self.layers)
        if self.cell == "delay":
            return (torch.zeros(n, batch, self.delay, self.hidden, device=device),)
        return tuple(torch.zeros(n, batch, self.hidden, device=device) for _ in self.state_names)

    def top_hidden(self, first_state: Tensor) -> Tensor:
        return first_state[-1, :, -1] if self.cell == "delay" else first_state[-1]

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        new: list[list[Tensor]] = [[] for _ in state]
        for i, layer in enumerate(self.layers):
            if i:
                x = self.drop(x)  # between layers, as nn.LSTM's dropout
            x, *layer_state = layer(x, *(s[i] for s in state))
            for parts, s in zip(new, layer_state, strict=True):
                parts.append(s)
        return x, tuple(torch.stack(parts) for parts in new)


def make_recurrent(cfg: ModelConfig) -> Recurrent:
    cfg.check()  # a ValueError (InputError) naming the option, for an unknown cell or a bad size
    args = (cfg.embedding_dim, cfg.hidden_size, cfg.num_layers, cfg.dropout)
    if cfg.cell in ("cifg", "delay"):
        return ScriptedRecurrent(cfg.cell, *args, delay=cfg.delay)
    return FusedRecurrent(cfg.cell, *args, irnn_scale=cfg.irnn_scale)


# ---- the language model ------------------------------------------------------------
class RNNLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.rnn = make_recurrent(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            # Press & Wolf 2017: sharing input and output embeddings cuts parameters
            # and improves perplexity for word-level models.
            self.decoder.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def state_names(self) -> tuple[str, ...]:
        return self.rnn.state_names

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        return self.rnn.init_state(batch, device)

    def state_batch_axis(self) -> int:
        return 1

    def hidden(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Top-layer outputs [batch, seq, hidden] and the new state."""
        out, new_state = self.rnn(self.drop(self.embed(tokens)), state)
        return self.drop(out), new_state

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Logits at every position [batch, seq, vocab] and the new state."""
        out, new_state = self.hidden(tokens, state)
        return self.decoder(out), new_state


class _Ranked(nn.Module):
    """Adds the top-k next words to a graph's outputs, offerable words only.

    The server mostly needs k suggestions, not 10,000 log-probabilities: ranking
    inside the graph moves O(k) numbers out of onnxruntime per session. ``offer``
    is 0 for words a user may be offered and -inf for punctuation and specials
    (``nextword.tokenizer.is_word``, the server's rule).
    """

    def __init__(self, model: RNNLanguageModel, offer: Tensor | None, top_k: int) -> None:
        super().__init__()
        self.model = model
        self.top_k = top_k
        self.offer: Tensor
        self.register_buffer("offer", offer if offer is not None else torch.zeros(model.cfg.vocab_size))

    def ranked(self, log_probs: Tensor) -> tuple[Tensor, ...]:
        if not self.top_k:
            return (log_probs,)
        values, ids = torch.topk(log_probs + self.offer, self.top_k, dim=-1)
        return log_probs, values, ids


class StepGraph(_Ranked):
    """Export view: (tokens, *state) -> (log_probs of the next word, *new_state[, top values, top ids])."""

    def __init__(self, model: RNNLanguageModel, offer: Tensor | None = None, top_k: int = 0) -> None:
        super().__init__(model, offer, top_k)

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        out, new_state = self.model.hidden(tokens, tuple(state))
        log_probs, *top = self.ranked(torch.log_softmax(self.model.decoder(out[:, -1]), dim=-1))
        return (log_probs, *new_state, *top)


class HeadGraph(_Ranked):
    """Export view: (first state tensor) -> log_probs[, top values, top ids], for a reply with no new word."""

    def __init__(self, model: RNNLanguageModel, offer: Tensor | None = None, top_k: int = 0) -> None:
        super().__init__(model, offer, top_k)

    def forward(self, first_state: Tensor) -> tuple[Tensor, ...]:
        return self.ranked(
            torch.log_softmax(self.model.decoder(self.model.rnn.top_hidden(first_state)), dim=-1)
        )
