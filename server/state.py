"""Every session's recurrent state in one preallocated array per state tensor.

A session owns a *slot*: an index along each tensor's batch axis. A batch of
steps gathers its sessions' slots with one ``np.take`` per tensor into buffers
kept per batch size, runs the graph, and scatters the new states into fresh
slots with one indexed assignment per tensor: no per-session Python work in
the hot loop, and an idle session costs exactly its state's bytes. A call of one
step (a lone typist's) copies its row by basic indexing instead: a few times
cheaper than np.take and fancy indexing, which matters most right after the
graph ran, when onnxruntime has pushed the interpreter's data out of the caches.

Slot 0 holds the initial state (after ``<eos>``), shared read-only by every new
or reset context. A step writes into a new slot, not over its source: the
servicer decides afterwards whether the session keeps the result (it may have
been taken over by another stream meanwhile), then frees the slot it drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nextword.bundle import StateTensor

INITIAL = 0


class StatePool:
    def __init__(
        self, spec: Sequence[StateTensor], initial: Sequence[np.ndarray], capacity: int = 1024
    ) -> None:
        self._axes = [s.batch_axis for s in spec]
        # Each tensor's index up to its batch axis: (*at, slot) is one slot's row, by basic indexing.
        self._at: list[tuple[Any, ...]] = [(slice(None),) * axis for axis in self._axes]
        self._arrays = [np.zeros(s.concrete_shape(capacity), dtype=np.dtype(s.dtype)) for s in spec]
        for array, at, value in zip(self._arrays, self._at, initial, strict=True):
            array[(*at, INITIAL)] = value[(*at, 0)]
        self._free = list(range(capacity - 1, INITIAL, -1))  # pop() hands out low slots first
        self._buffers: dict[int, list[np.ndarray]] = {}
        self.slot_bytes = sum(a.nbytes // a.shape[ax] for a, ax in zip(self._arrays, self._axes, strict=True))

    @property
    def capacity(self) -> int:
        return self._arrays[0].shape[self._axes[0]]

    @property
    def in_use(self) -> int:
        return self.capacity - 1 - len(self._free)

    def alloc(self) -> int:
        if not self._free:
            self._grow()
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot != INITIAL:
            self._free.append(slot)

    def gather(self, slots: Sequence[int]) -> list[np.ndarray]:
        """The states of ``slots`` as one batch (valid until the next gather of this size)."""
        n = len(slots)
        buffers = self._buffers.get(n)
        if buffers is None:
            shapes = [self._shape(a, ax, n) for a, ax in zip(self._arrays, self._axes, strict=True)]
            buffers = self._buffers[n] = [
                np.empty(s, dtype=a.dtype) for s, a in zip(shapes, self._arrays, strict=True)
            ]
        if n == 1:  # a lone step: a basic-indexed copy, a few times cheaper than np.take
            for array, at, out in zip(self._arrays, self._at, buffers, strict=True):
                out[(*at, 0)] = array[(*at, slots[0])]
            return buffers
        index = np.asarray(slots, dtype=np.intp)
        for array, axis, out in zip(self._arrays, self._axes, buffers, strict=True):
            np.take(array, index, axis=axis, out=out)
        return buffers

    def scatter(self, slots: Sequence[int], state: Sequence[np.ndarray]) -> None:
        """Write row b of a batch ``state`` into ``slots[b]``; a negative slot: nobody keeps that row."""
        if len(slots) == 1:  # a lone step (see gather)
            if slots[0] >= 0:
                for array, at, value in zip(self._arrays, self._at, state, strict=True):
                    array[(*at, slots[0])] = value[(*at, 0)]
            return
        dst = np.asarray(slots, dtype=np.intp)
        keep = dst >= 0
        slots_kept, rows = dst[keep], np.flatnonzero(keep)
        for array, axis, value in zip(self._arrays, self._axes, state, strict=True):
            # The batch axis first on views of both (no copy; the same swap, so elements correspond),
            # then one fancy-indexed assignment. swapaxes: a C method, unlike np.moveaxis's Python.
            array.swapaxes(0, axis)[slots_kept] = value.swapaxes(0, axis)[rows]

    def rows_bytes(self, state: Sequence[np.ndarray], rows: Sequence[int]) -> list[bytes]:
        """Rows ``rows`` of a batch ``state`` as bytes, each tensor's row after the other (a stored
        session's state): one copy per tensor for the whole batch, then a slice each."""
        n = len(rows)
        if n == 0:
            return []
        # The batch axis first (moveaxis keeps the other axes in their order, as np.take does),
        # the rows picked, every tensor's row side by side as raw bytes.
        parts = [
            np.moveaxis(value, axis, 0)[rows].reshape(n, -1).view(np.uint8)
            for value, axis in zip(state, self._axes, strict=True)
        ]
        table = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return [row.tobytes() for row in table]

    def load(self, slot: int, data: bytes) -> None:
        """Write a state stored by ``rows_bytes`` into ``slot``; ValueError if not this model's size."""
        if len(data) != self.slot_bytes:
            raise ValueError(f"stored state is {len(data)} bytes, this model's is {self.slot_bytes}")
        at = 0
        for array, axis in zip(self._arrays, self._axes, strict=True):
            view = np.moveaxis(array, axis, 0)[slot]
            size = view.nbytes
            view[...] = np.frombuffer(data, dtype=array.dtype, count=view.size, offset=at).reshape(view.shape)
            at += size

    def read(self, slot: int) -> list[np.ndarray]:
        """One slot's state as a batch of one (a copy)."""
        return [np.take(a, [slot], axis=ax) for a, ax in zip(self._arrays, self._axes, strict=True)]

    def _grow(self) -> None:
        # Doubling keeps slot indices stable and growth amortised O(1) per session. The new
        # arrays come from np.zeros (calloc): pages of slots no session has used yet cost no
        # memory, so capacity held in reserve is not resident (free slots are handed out low first).
        old = self.capacity
        grown = []
        for array, axis in zip(self._arrays, self._axes, strict=True):
            bigger = np.zeros(self._shape(array, axis, 2 * old), dtype=array.dtype)
            bigger[(slice(None),) * axis + (slice(0, old),)] = array
            grown.append(bigger)
        self._arrays = grown
        self._free.extend(range(2 * old - 1, old - 1, -1))

    @staticmethod
    def _shape(array: np.ndarray, axis: int, n: int) -> tuple[int, ...]:
        shape = list(array.shape)
        shape[axis] = n
        return tuple(shape)
