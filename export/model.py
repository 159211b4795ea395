"""Word-level recurrent language model: embedding -> recurrent layers -> tied softmax.

One module serves training (full sequences, logits at every position) and
export (``StepGraph``/``HeadGraph``: the recurrent state made explicit as named
inputs and outputs, which is how the server drives it one word at a time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]

CELLS = ("lstm", "gru", "rnn")


@dataclass
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"
    embedding_dim: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.3
    tie_weights: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # cell-specific options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RNNLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown cell {cfg.cell!r}; choose one of {', '.join(CELLS)}")
        if cfg.tie_weights and cfg.embedding_dim != cfg.hidden_size:
            raise ValueError("tied weights need --embedding-dim equal to --hidden-size")
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell]
        self.rnn = rnn_cls(
            cfg.embedding_dim,
            cfg.hidden_size,
            cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            # Press & Wolf 2017: sharing input and output embeddings cuts parameters
            # and improves perplexity for word-level models.
            self.decoder.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    # ---- state -------------------------------------------------------------
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cfg.cell == "lstm" else ("h",)

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        shape = (self.cfg.num_layers, batch, self.cfg.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names())

    def state_batch_axis(self) -> int:
        return 1

    # ---- compute -----------------------------------------------------------
    def hidden(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Top-layer outputs [batch, seq, hidden] and the new state."""
        x = self.drop(self.embed(tokens))
        rnn_state = state if self.cfg.cell == "lstm" else state[0]
        out, new = self.rnn(x, rnn_state)
        new_state = tuple(new) if isinstance(new, tuple) else (new,)
        return self.drop(out), new_state

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Logits at every position [batch, seq, vocab] and the new state."""
        out, new_state = self.hidden(tokens, state)
        return self.decoder(out), new_state

    def top_hidden(self, state: State) -> Tensor:
        """The last layer's hidden state [batch, hidden]: what the next word is read from."""
        return state[0][-1]


class StepGraph(nn.Module):
    """Export view: (tokens, *state) -> (log_probs of the next word, *new_state)."""

    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        out, new_state = self.model.hidden(tokens, tuple(state))
        log_probs = torch.log_softmax(self.model.decoder(out[:, -1]), dim=-1)
        return (log_probs, *new_state)


class HeadGraph(nn.Module):
    """Export view: (*state) -> log_probs, for a reply that brings no new word."""

    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: Tensor) -> Tensor:
        return torch.log_softmax(self.model.decoder(h[-1]), dim=-1)
