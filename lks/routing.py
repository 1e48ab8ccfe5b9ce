"""Where prompts go: the token position of an edited subject in a batch of token ids, and how
well the scope indicator routes an edit set's prompts.

The scope indicator (:mod:`lks.scope`) works on text; the KB replacer sees token ids. A
:class:`TokenRouter` rebuilds each row's text from cached per-token pieces (a token decoded once),
finds the subject in it and maps the match's last character back to its token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lks.scope import ScopeIndicator


class TokenRouter:
    """Scope detection on token ids for one tokenizer (its per-token texts cached in ``pieces``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pieces: dict[int, str] = {}  # token id -> surface text
        self.special_ids = set(tokenizer.all_special_ids)

    def piece(self, tok_id: int) -> str:
        """Surface text of one token id (with its leading space), cached."""
        p = self.pieces.get(tok_id)
        if p is None:
            tk = self.tokenizer
            if tok_id in self.special_ids:
                p = ""
            else:
                # decode after an anchor token so a leading space is not stripped (SentencePiece)
                anchor = tk.convert_tokens_to_ids(tk.tokenize("a"))[-1:]
                p = tk.decode(anchor + [tok_id])[len(tk.decode(anchor)):]
            self.pieces[tok_id] = p
        return p

    def route(self, scope: ScopeIndicator, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None) -> tuple[list[int], list[int], list[int]]:
        """``(rows, positions, subject ids)`` of the rows of ``input_ids`` ``[batch, T]`` in which
        ``scope`` finds an edited subject; the position is the token holding the subject's last
        character. Padding (``attention_mask`` 0) is skipped."""
        rows, positions, subjects = [], [], []
        ids = input_ids.tolist()
        mask = attention_mask.tolist() if attention_mask is not None else None
        for r, row in enumerate(ids):
            keep = [j for j in range(len(row)) if mask is None or mask[r][j]]
            pieces = [self.piece(row[j]) for j in keep]
            text = "".join(pieces)
            split_chars = "\ufffd" in text  # a character split across byte-level tokens ("é" = 2 tokens)
            if split_chars:
                text = self.tokenizer.decode([row[j] for j in keep], skip_special_tokens=True)
            m = scope.find(text)
            if m is None:
                continue
            pos = self._token_at_char(row, keep, pieces, m.end - 1, split_chars)
            if pos is not None:
                rows.append(r)
                positions.append(pos)
                subjects.append(m.index)
        return rows, positions, subjects

    def _token_at_char(self, row: list[int], keep: list[int], pieces: list[str], char: int, split_chars: bool) -> int | None:
        """Position of the token whose text contains character ``char`` of the row's text."""
        if not split_chars:
            acc = 0
            for k, p in zip(keep, pieces):
                acc += len(p)
                if acc > char:
                    return k
            return None
        # rare (non-ASCII subjects on byte-level tokenizers): decode growing prefixes of the row,
        # a dangling partial character (U+FFFD at the end) does not count yet
        for n, k in enumerate(keep, start=1):
            if len(self.tokenizer.decode([row[j] for j in keep[:n]], skip_special_tokens=True).rstrip("\ufffd")) > char:
                return k
        return None


def scope_diagnostics(scope: ScopeIndicator, edits: Iterable[Any]) -> dict[str, float]:
    """Precision/recall of ``scope`` on the prompts of ``edits`` (:class:`lks.data.EditRecord`), by prompt kind.

    Recall on same-subject prompts (edit prompt, paraphrases, locality prompts): the prompt is
    routed to its own subject. ``neighborhood_routed``: fraction of other-subject prompts routed to
    some edited subject (only right when that other subject is itself edited). ``precision``: of
    all routings on same-subject prompts, the fraction that chose the right subject.
    """
    out: dict[str, float] = {}
    right = wrong = 0
    for name, get in [("prompt", lambda r: [r.prompt]), ("rephrase", lambda r: list(r.rephrases)),
                      ("locality", lambda r: [p for p, _ in r.locality])]:
        hits = total = 0
        for r in edits:
            for text in get(r):
                m = scope.find(text)
                total += 1
                if m is not None:
                    if m.subject == r.subject:
                        hits += 1
                        right += 1
                    else:
                        wrong += 1
        if total:
            out[f"scope_recall_{name}"] = hits / total
    nb = [p for r in edits for p, _ in r.neighborhood]
    if nb:
        out["scope_neighborhood_routed"] = sum(scope.find(p) is not None for p in nb) / len(nb)
    out["scope_precision"] = right / (right + wrong) if right + wrong else float("nan")
    return out
