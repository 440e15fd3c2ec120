"""Prompts the target writes itself (Magpie, Xu et al. 2024), and the filters every distilled prompt passes.

Magpie: an aligned chat model, fed its own template up to the opening of a user turn, writes a user
request, because that is what follows in its training data. Sampled at T = 1, top_p 0.99, that gives
varied, realistic requests in the target's own distribution; fed with a conversation so far, it writes
the follow-up turn (MT-Bench's turn 2 is such a follow-up).

Filters (in this order, counted per reason): too short, cut by the token cap, role markers in the text
(the model wrote past its turn), near-duplicate of a kept prompt (MinHash over word 3-grams, datasketch's
LSH), and overlap with the evaluation benchmark (the share of the prompt's word n-grams that appear in
any MT-Bench turn; above `max_fraction` the prompt is dropped, every score is reported).
"""

from __future__ import annotations

from collections import Counter

from harness.data.sharegpt import normalise

SENTINEL = "\u2063specdec-user-turn\u2063"       # text no model writes: marks where the user turn goes


def open_user_turn(template, history: list[tuple[str, str]]) -> str:
    """The template's text for `history` followed by an opened, empty user turn."""
    text = template.prompt_text(history + [(SENTINEL, None)])
    return text[: text.index(SENTINEL)]


def user_turn_stops(template) -> list[str]:
    """Strings that close a user turn in this template (ChatML `<|im_end|>`, Vicuna `ASSISTANT:`, Llama-2
    `[/INST]`), plus the template's own stop strings."""
    text = template.prompt_text([(SENTINEL, None)])
    tail = text[text.index(SENTINEL) + len(SENTINEL):].strip()
    stops = [tail.split()[0]] if tail else []
    return stops + [s for s in template.stop_strings if s not in stops]


def encode_prefix(template, text: str) -> list[int]:
    return list(template.tokenizer(text, add_special_tokens=template.add_special_tokens).input_ids)


def role_markers(template) -> list[str]:
    """Text that only appears in a turn that ran past its end."""
    text = template.prompt_text([(SENTINEL, None)])
    head, tail = text.split(SENTINEL)
    markers = {m for m in (head.strip().split()[-1:] + tail.strip().split()[:1]) if m}
    return sorted(markers | {SENTINEL})


def clean_user_turn(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


class EvalOverlap:
    """Share of a prompt's word n-grams found in the evaluation questions (1.0 for an exact copy)."""

    def __init__(self, eval_turns: list[str], n: int = 8):
        self.n = int(n)
        self.grams: set[tuple[str, ...]] = set()
        for turn in eval_turns:
            self.grams |= word_ngrams(turn, self.n)
        self.exact = {normalise(t) for t in eval_turns}

    def score(self, text: str) -> float:
        if normalise(text) in self.exact:
            return 1.0
        grams = word_ngrams(text, self.n)
        return sum(g in self.grams for g in grams) / len(grams) if grams else 0.0


class NearDuplicates:
    """MinHash LSH over word 3-grams (datasketch): `add(key, text)` is False for a near-duplicate."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 64):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = float(threshold), int(num_perm)
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.size = 0

    def _minhash(self, text: str):
        from datasketch import MinHash

        minhash = MinHash(num_perm=self.num_perm, seed=1)
        for gram in word_ngrams(text, 3):
            minhash.update(" ".join(gram).encode("utf-8"))
        return minhash

    def add(self, key: str, text: str) -> bool:
        minhash = self._minhash(text)
        if self.lsh.query(minhash):
            return False
        self.lsh.insert(key, minhash)
        self.size += 1
        return True


class PromptFilter:
    """Every filter a prompt passes, with the count of what each one dropped."""

    def __init__(self, template, overlap: EvalOverlap | None, max_overlap: float, dedup_threshold: float,
                 min_chars: int):
        self.overlap, self.max_overlap = overlap, float(max_overlap)
        self.duplicates = NearDuplicates(dedup_threshold)
        self.min_chars = int(min_chars)
        self.markers = role_markers(template)
        self.dropped: Counter = Counter()
        self.kept = 0
        self.max_kept_overlap = 0.0

    def check(self, key: str, text: str, truncated: bool = False, dedup: bool = True) -> str | None:
        """None when the prompt is kept, else the reason it is dropped."""
        reason = None
        if truncated:
            reason = "cut_by_token_cap"
        elif len(text) < self.min_chars:
            reason = "too_short"
        elif any(m in text for m in self.markers):
            reason = "role_marker"
        else:
            score = self.overlap.score(text) if self.overlap is not None else 0.0
            if score > self.max_overlap:
                reason = "eval_overlap"
            elif dedup and not self.duplicates.add(key, text):
                reason = "near_duplicate"
            else:
                self.max_kept_overlap = max(self.max_kept_overlap, score)
        if reason:
            self.dropped[reason] += 1
        else:
            self.kept += 1
        return reason

    def stats(self) -> dict:
        return {"kept": self.kept, "dropped": dict(self.dropped), "max_kept_eval_overlap": self.max_kept_overlap}
