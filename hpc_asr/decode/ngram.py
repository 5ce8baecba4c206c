"""Word n-gram language model for CTC beam search: build an ARPA file from training transcripts
and read it back (the tuning of its weight is ``hpc_asr.decode.tune``).

    hpc-asr lm --manifest data/va/train.jsonl --order 3 --out runs/demo/lm/lm.arpa

The model is interpolated modified Kneser-Ney (Chen & Goodman, 1998), the estimator of KenLM's
``lmplz`` and SRILM's ``-kndiscount -interpolate``: three discounts per order from the counts of
counts, continuation counts for the lower orders (except n-grams starting with ``<s>``), the
unigram interpolated with a uniform distribution that gives ``<unk>`` its mass. Interpolated KN
is written exactly as a backoff ARPA (the backoff weight of a history is its interpolation
weight), which KenLM (inside flashlight-text's decoder) loads. No ``lmplz`` binary is needed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from hpc_asr.atomic import atomic_path
from hpc_asr.data.text import normalize

__all__ = ["Arpa", "build_arpa", "kneser_ney", "main", "read_arpa", "write_arpa"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Gram = tuple[str, ...]


def _counts(sentences: list[str], order: int) -> list[Counter]:
    """Raw n-gram counts per order (index k-1 holds k-grams) over ``<s> w1 .. wn </s>``."""
    raw = [Counter() for _ in range(order)]
    for s in sentences:
        words = [BOS, *s.split(), EOS]
        for k in range(1, order + 1):
            for i in range(len(words) - k + 1):
                raw[k - 1][tuple(words[i : i + k])] += 1
    return raw


def _adjusted(raw: list[Counter]) -> list[Counter]:
    """Kneser-Ney counts: the highest order and n-grams starting with <s> keep raw counts, the
    others count distinct left contexts (how many word types precede them)."""
    order = len(raw)
    adj = [Counter() for _ in range(order)]
    adj[-1] = Counter(raw[-1])
    for k in range(order - 1, 0, -1):  # k-grams from (k+1)-grams
        for g in raw[k]:
            adj[k - 1][g[1:]] += 1
        for g, c in raw[k - 1].items():
            if g[0] == BOS:
                adj[k - 1][g] = c
    del adj[0][(BOS,)]
    return adj


def _discounts(counts: Counter) -> tuple[float, float, float]:
    """D1, D2, D3+ from the counts of counts (Chen & Goodman); safe values when they are sparse."""
    n = Counter(min(c, 4) for c in counts.values())
    if min(n[1], n[2], n[3], n[4]) == 0:
        return 0.5, 1.0, 1.5
    y = n[1] / (n[1] + 2 * n[2])
    ds = (1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3])
    return tuple(min(max(d, 0.05), c - 0.05) for c, d in zip((1, 2, 3), ds))  # type: ignore[return-value]


def kneser_ney(sentences: list[str], order: int) -> tuple[list[dict[Gram, float]], list[dict[Gram, float]]]:
    """(probabilities, backoff weights) per order, natural probabilities (not logs).

    ``probs[k-1][g]`` is p(g[-1] | g[:-1]) for every seen k-gram; ``bows[k-1][h]`` is the weight
    given to the lower order after history ``h`` (a k-gram)."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    adj = _adjusted(_counts(sentences, order))
    vocab = sorted({g[0] for g in adj[0]} | {UNK})
    probs: list[dict[Gram, float]] = []
    bows: list[dict[Gram, float]] = [{} for _ in range(order)]
    for k in range(1, order + 1):
        d = _discounts(adj[k - 1])
        total: dict[Gram, float] = defaultdict(float)
        mass: dict[Gram, float] = defaultdict(float)
        for g, c in adj[k - 1].items():
            total[g[:-1]] += c
            mass[g[:-1]] += d[min(c, 3) - 1]
        gamma = {h: mass[h] / total[h] for h in total}
        p: dict[Gram, float] = {}
        for g, c in adj[k - 1].items():
            h = g[:-1]
            lower = 1.0 / len(vocab) if k == 1 else probs[k - 2][g[1:]]
            p[g] = (c - d[min(c, 3) - 1]) / total[h] + gamma[h] * lower
        if k == 1:
            p[(UNK,)] = gamma[()] / len(vocab) + p.get((UNK,), 0.0)
        else:
            bows[k - 2] = gamma
        probs.append(p)
    return probs, bows


def write_arpa(path: Path, probs: list[dict[Gram, float]], bows: list[dict[Gram, float]]) -> None:
    """The ARPA text format: log10 probability, the n-gram, and a log10 backoff where one exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    uni = dict(probs[0])
    lines = ["", "\\data\\"] + [f"ngram {k + 1}={len(p) + (k == 0)}" for k, p in enumerate(probs)]
    for k, p in enumerate(probs):
        lines += ["", f"\\{k + 1}-grams:"]
        items = sorted(p.items()) if k else sorted({**uni, (BOS,): 0.0}.items())
        for g, pr in items:
            lp = -99.0 if g == (BOS,) else math.log10(pr)
            bow = bows[k].get(g)
            tail = f"\t{math.log10(bow):.6f}" if bow is not None and bow > 0 else ""
            lines.append(f"{lp:.6f}\t{' '.join(g)}{tail}")
    lines += ["", "\\end\\", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def build_arpa(texts: list[str], order: int, out: Path) -> dict:
    """Normalise ``texts`` the way the tokenizer does, estimate, write; returns a summary."""
    sentences = [t for t in (normalize(x) for x in texts) if t]
    if not sentences:
        raise ValueError("no non-empty transcripts to build a language model from")
    probs, bows = kneser_ney(sentences, order)
    write_arpa(out, probs, bows)
    return {"arpa": str(out), "order": order, "sentences": len(sentences),
            "ngrams": [len(p) for p in probs], "vocabulary": len(probs[0]) - 2}  # less </s> and <unk>


class Arpa:
    """An ARPA model read back into dictionaries: the vocabulary (for the decoder's lexicon)
    and a backoff query, used to check what was written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.logp: dict[Gram, float] = {}
        self.logbow: dict[Gram, float] = {}
        self.order = 0
        section = 0
        for lineno, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:].split("-")[0])
                self.order = max(self.order, section)
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if section == 0 or len(parts) < 2:
                raise ValueError(f"{self.path}:{lineno}: not an ARPA n-gram line: {line[:60]!r}")
            g = tuple(parts[1].split()) if "\t" in line else tuple(parts[1 : 1 + section])
            self.logp[g] = float(parts[0])
            if len(parts) > (2 if "\t" in line else 1 + section):
                self.logbow[g] = float(parts[-1])
        if not self.order:
            raise ValueError(f"{self.path}: no n-gram sections; not an ARPA file")

    @property
    def words(self) -> list[str]:
        """Every unigram but the sentence markers, in file order."""
        return [g[0] for g in self.logp if len(g) == 1 and g[0] not in (BOS, EOS, UNK)]

    def log10_prob(self, word: str, history: Gram) -> float:
        """log10 p(word | history) with backoff; unknown words score as <unk>."""
        if (word,) not in self.logp:
            word = UNK
        history = history[-(self.order - 1) :] if self.order > 1 else ()
        bow = 0.0
        while (*history, word) not in self.logp:
            bow += self.logbow.get(history, 0.0)
            history = history[1:]
        return bow + self.logp[(*history, word)]


def read_arpa(path: str | Path) -> Arpa:
    return Arpa(path)


def _build(args) -> int:
    from hpc_asr.data.manifest import ManifestError, read_manifest

    try:
        texts = [u.text for m in args.manifest for u in read_manifest(m)]
        summary = build_arpa(texts, args.order, args.out)
    except (ManifestError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[lm] {args.out}: order {args.order}, {summary['sentences']} sentences, "
          f"n-grams {summary['ngrams']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, type=Path, action="append",
                   help="JSONL manifest(s) whose transcripts train the LM (repeatable)")
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--out", required=True, type=Path, help="ARPA file to write")
    args = p.parse_args(argv)
    if not 1 <= args.order <= 6:
        p.error(f"--order {args.order}: expected 1..6")
    return _build(args)


if __name__ == "__main__":
    sys.exit(main())
