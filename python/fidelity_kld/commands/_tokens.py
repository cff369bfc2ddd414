"""Token listings for `compare --top-tokens / --top-prompts`: which tokens, where, and (with
`--tokenizer`) their text and the text before them. The choice of tokens is
fidelity_kld.stats.paired's; this module only looks things up."""

from __future__ import annotations

import os

import numpy as np

from ..cli import InputError

CONTEXT_TOKENS = 12


class Tokenizer:
    """id -> text, over a SentencePiece model or a Hugging Face tokenizer."""

    def __init__(self, piece, decode):
        self._piece, self._decode = piece, decode

    def piece(self, token_id: int) -> str:
        """The token's own text, quoted so spaces and newlines show."""
        return repr(self._piece(int(token_id)))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece .model file (needs the sentencepiece package) or a Hugging Face
    tokenizer directory (needs transformers)."""
    if os.path.isdir(path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise InputError(f"{path}: a tokenizer directory needs transformers "
                             "(pip install 'fidelity-kld[hf]')") from None
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many kinds; the message says which
            raise InputError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
        return Tokenizer(lambda i: tok.decode([i]), lambda ids: tok.decode(ids))
    try:
        import sentencepiece as spm
    except ImportError:
        raise InputError(f"{path}: a SentencePiece model needs the sentencepiece package "
                         "(pip install sentencepiece)") from None
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    return Tokenizer(lambda i: sp.decode([i]) if 0 <= i < sp.get_piece_size() else f"<{i}>",
                     lambda ids: sp.decode([i for i in ids if 0 <= i < sp.get_piece_size()]))


def _visible(text: str) -> str:
    """Newlines and tabs written as escapes, so a listing stays one line per token."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _token_row(st, prompt_ids, i: int, rank: int, tok: Tokenizer | None) -> dict:
    from ..stats.paired import per_token_values

    kld = per_token_values(st, "kld")
    if prompt_ids is not None:
        pid = int(prompt_ids[i])
        first = i
        while first > 0 and prompt_ids[first - 1] == pid:
            first -= 1
    else:
        pid, first = -1, 0
    label = int(st.labels[i]) if st.labels is not None else -1
    row = {"rank": rank, "token": int(i), "prompt": pid, "position": int(i - first),
           "kld": float(kld[i]), "label": label,
           "top1_ref": int(st.top1_ref[i]), "top1_q": int(st.top1_q[i]),
           "p_ref_y": float(st.p_ref_y[i]) if st.p_ref_y is not None else float("nan"),
           "p_q_y": float(st.p_q_y[i]) if st.p_q_y is not None else float("nan")}
    if tok is not None:
        for key in ("label", "top1_ref", "top1_q"):
            if row[key] >= 0:
                row[f"{key}_text"] = tok.piece(row[key])
        if st.labels is not None:
            # labels are the tokens each row predicts: the ones before row i are its context
            before = st.labels[max(first, i - CONTEXT_TOKENS):i]
            row["context"] = _visible(tok.decode(before))[-60:] + " ⟨" + _visible(tok.decode([label])) + "⟩"
    return row


def top_token_rows(st, prompt_ids, n: int, tok: Tokenizer | None = None) -> list[dict]:
    """The n most divergent tokens of one model, largest KLD first."""
    from ..stats.paired import top_divergent

    return [_token_row(st, prompt_ids, int(i), r, tok)
            for r, i in enumerate(top_divergent(st, n), start=1)]


def top_prompt_rows(st, prompt_ids, n: int, tok: Tokenizer | None = None) -> list[dict]:
    """The n prompts with the largest mean KLD, each with its worst token."""
    from ..stats.paired import worst_prompts

    rows = []
    for r, (pid, mean, worst) in enumerate(worst_prompts(st, np.asarray(prompt_ids), n), start=1):
        row = _token_row(st, prompt_ids, worst, r, tok)
        row["prompt_kld"] = mean
        rows.append(row)
    return rows
