"""Per-sequence edits of the logits before temperature and filtering, with vLLM's meanings:
`logit_bias`, `min_tokens` (stop tokens masked until then) and the repetition, frequency and
presence penalties. Everything runs on the logits' device; what decides shapes (which rows need
what) is mirrored on the host, so nothing waits for the device. A batch whose rows use none of
them costs one host check.

Penalties need each sequence's token counts: a sequence that asks for one takes a row of
`counts` (output tokens, int32) and `seen` (its prompt's tokens, bool), both [rows, vocab] on the
device, filled from the history its SeqParams carries (its prompt and, after a preemption, what
it generated before) and bumped with every token sampled for it. Rows are taken only while such
sequences run; the tables grow on demand and are reused, so engines that never see a penalty never
allocate them.
"""

from __future__ import annotations

import numpy as np
import torch

from toka.protocol import SeqParams
from workers import staging


class LogitsProcessor:
    def __init__(self, num_slots: int, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        f32 = dict(dtype=torch.float32, device=device)
        self.repetition = torch.ones(num_slots, **f32)
        self.frequency = torch.zeros(num_slots, **f32)
        self.presence = torch.zeros(num_slots, **f32)
        # host: per slot, what its rows need
        self.row_of = np.full(num_slots, -1, dtype=np.int64)  # penalty-table row, -1: none
        self.min_tokens = np.zeros(num_slots, dtype=np.int64)
        self.prompt_len = np.zeros(num_slots, dtype=np.int64)
        self.stop_ids: list[np.ndarray | None] = [None] * num_slots  # masked before min_tokens
        self.bias: list[tuple[np.ndarray, np.ndarray] | None] = [None] * num_slots
        self.edited = np.zeros(num_slots, dtype=bool)  # a logit_bias, or stop tokens to hold back
        self.active = np.zeros(num_slots, dtype=bool)  # any of the above
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.free_rows: list[int] = []

    # ---- admission -----------------------------------------------------------------------------
    def admit(self, a: SeqParams) -> None:
        """Takes a sequence's settings for its slot (a slot's previous sequence has left it)."""
        s = a.slot
        self.min_tokens[s], self.prompt_len[s] = a.min_tokens, a.prompt_len
        self.stop_ids[s] = np.asarray(a.stop_token_ids, dtype=np.int64) if a.min_tokens and a.stop_token_ids else None
        self.bias[s] = None
        if a.logit_bias:
            self.bias[s] = (np.fromiter(a.logit_bias.keys(), dtype=np.int64),
                            np.fromiter(a.logit_bias.values(), dtype=np.float32))
        penalized = a.repetition_penalty != 1.0 or a.frequency_penalty != 0.0 or a.presence_penalty != 0.0
        if penalized:
            self._fill_row(s, a)
        elif self.row_of[s] >= 0:
            self.free_rows.append(int(self.row_of[s]))
            self.row_of[s] = -1
        self.edited[s] = self.bias[s] is not None or self.stop_ids[s] is not None
        self.active[s] = penalized or self.edited[s]

    def _fill_row(self, slot: int, a: SeqParams) -> None:
        row = int(self.row_of[slot])
        if row < 0:
            if not self.free_rows:
                self._grow()
            row = self.free_rows.pop()
            self.row_of[slot] = row
        self.repetition[slot], self.frequency[slot], self.presence[slot] = (
            a.repetition_penalty, a.frequency_penalty, a.presence_penalty)
        history = self._to_device(np.asarray(a.history, dtype=np.int64))
        prompt, output = history[: a.prompt_len], history[a.prompt_len :]
        self.counts[row].zero_()
        self.seen[row].zero_()
        self.seen[row, prompt] = True
        self.counts[row].index_add_(0, output, torch.ones_like(output, dtype=torch.int32))

    def _grow(self) -> None:
        """Doubles the penalty tables (at least 8 rows)."""
        old = self.counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, self.vocab, dtype=torch.int32, device=self.device)
        seen = torch.zeros(new, self.vocab, dtype=torch.bool, device=self.device)
        counts[:old], seen[:old] = self.counts, self.seen
        self.counts, self.seen = counts, seen
        self.free_rows.extend(range(new - 1, old - 1, -1))

    # ---- per step ------------------------------------------------------------------------------
    def needed(self, slots: np.ndarray) -> bool:
        return bool(self.active[slots].any())

    def apply(self, logits: torch.Tensor, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """logits [rows, V] float32 of rows in `slots` whose sampled token takes `positions` (host
        arrays); returns the edited logits (in place where possible)."""
        rows, cols, values = [], [], []
        for i in np.flatnonzero(self.edited[slots]).tolist():  # Python per row: only rows with edits
            s = int(slots[i])
            if self.bias[s] is not None:
                ids, bias = self.bias[s]
                rows.append(np.full(len(ids), i))
                cols.append(ids)
                values.append(bias)
            stop = self.stop_ids[s]
            if stop is not None and positions[i] - self.prompt_len[s] < self.min_tokens[s]:
                rows.append(np.full(len(stop), i))
                cols.append(stop)
                values.append(np.full(len(stop), -np.inf, dtype=np.float32))
        if rows:
            r, c = self._to_device(np.concatenate(rows)), self._to_device(np.concatenate(cols))
            logits.index_put_((r, c), self._to_device(np.concatenate(values), torch.float32), accumulate=True)
        pen = np.flatnonzero(self.row_of[slots] >= 0)
        if len(pen):
            idx = self._to_device(np.stack([pen, self.row_of[slots[pen]], slots[pen]]))
            i, row, slot = idx[0], idx[1], idx[2]
            part, counts = logits[i], self.counts[row]
            occurred = counts > 0
            rep = self.repetition[slot][:, None]
            part = torch.where(occurred | self.seen[row], torch.where(part > 0, part / rep, part * rep), part)
            part = part - self.frequency[slot][:, None] * counts - self.presence[slot][:, None] * occurred
            logits[i] = part
        return logits

    def record(self, slots: np.ndarray, tokens: torch.Tensor) -> None:
        """Counts the tokens just sampled ([rows] on the device) for the rows that keep counts."""
        pen = np.flatnonzero(self.row_of[slots] >= 0)
        if len(pen):
            idx = self._to_device(np.stack([pen, self.row_of[slots[pen]]]))
            one = torch.ones(len(pen), dtype=torch.int32, device=self.device)
            self.counts.index_put_((idx[1], tokens[idx[0]]), one, accumulate=True)

    def _to_device(self, values: np.ndarray, dtype=torch.int64) -> torch.Tensor:
        return staging.to_device(values, dtype, self.device)
