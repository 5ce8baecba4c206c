"""hpc_asr.decode.wer: every reported WER/CER rests on these counts. Hand-computed cases pin the
substitution/deletion/insertion split, empty references and character counts; random cases are
checked against an independent edit distance and against jiwer's own rates."""

from __future__ import annotations

import random

import jiwer
import pytest

from hpc_asr.decode.wer import COUNT_KEYS, error_counts, frequent_errors, rates


def _edit_distance(ref: list, hyp: list) -> int:
    """Plain Levenshtein distance, written here so the check does not lean on jiwer."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def test_substitution_deletion_and_insertion_are_counted_apart():
    # "a b c d" → "a x c": b→x substituted, d deleted; "x y" → "x y z": z inserted;
    # "" → "q r": both words inserted (an empty reference is counted, not skipped).
    c = error_counts(["a b c d", "x y", ""], ["a x c", "x y z", "q r"])
    assert set(c) == set(COUNT_KEYS)
    assert (c["substitutions"], c["deletions"], c["insertions"]) == (1, 1, 3)
    assert c["word_errors"] == 5 and c["words"] == 6  # 4 + 2 + 0 reference words
    # characters, spaces included: "a b c d"→"a x c" is 3 edits (b→x, " " and d deleted),
    # "x y"→"x y z" 2 (" z"), ""→"q r" 3; the references hold 7 + 3 + 0 characters
    assert c["char_errors"] == 8 and c["chars"] == 10
    wer, cer = rates(c)
    assert wer == pytest.approx(5 / 6) and cer == pytest.approx(8 / 10)


@pytest.mark.parametrize(("ref", "hyp", "sdi"), [
    ("the cat sat", "the cat sat", (0, 0, 0)),
    ("the cat sat", "the bat sat", (1, 0, 0)),
    ("the cat sat", "the sat", (0, 1, 0)),
    ("the cat sat", "the cat sat down", (0, 0, 1)),
    ("the cat sat", "", (0, 3, 0)),  # an empty hypothesis deletes every reference word
    ("one two three four", "two three for", (1, 1, 0)),
    ("a b", "x a b y z", (0, 0, 3)),
])
def test_hand_computed_split(ref, hyp, sdi):
    c = error_counts([ref], [hyp])
    assert (c["substitutions"], c["deletions"], c["insertions"]) == sdi
    assert c["word_errors"] == sum(sdi) and c["words"] == len(ref.split())
    assert c["chars"] == len(ref) and c["char_errors"] == _edit_distance(list(ref), list(hyp))


def test_empty_references_count_hypothesis_words_as_insertions():
    c = error_counts(["", "   "], ["hello world", ""])
    assert c == {"word_errors": 2, "words": 0, "substitutions": 0, "deletions": 0, "insertions": 2,
                 "char_errors": len("hello world"), "chars": 0}
    # no reference words at all: the rate is the error count, not a division by zero
    assert rates(c) == (2.0, 11.0)
    assert error_counts(["  "], ["hi"])["insertions"] == 1  # a blank reference is empty, counted once
    assert error_counts([], []) == dict.fromkeys(COUNT_KEYS, 0) and rates(dict.fromkeys(COUNT_KEYS, 0)) == (0.0, 0.0)


def test_counts_sum_over_utterances():
    """Ranks all-reduce the counts before dividing, so counting a split must equal counting the whole."""
    refs = ["the cat sat", "", "on the mat", "a b c d"]
    hyps = ["the bat sat down", "uh", "on mat", "a x c"]
    whole = error_counts(refs, hyps)
    parts = [error_counts(refs[:2], hyps[:2]), error_counts(refs[2:], hyps[2:])]
    assert whole == {k: parts[0][k] + parts[1][k] for k in COUNT_KEYS}


def test_random_cases_agree_with_an_independent_edit_distance_and_jiwer():
    rng = random.Random(0)
    vocab = ["a", "an", "the", "cat", "sat", "on", "mat", "dog", "it's"]
    refs, hyps = [], []
    for _ in range(200):
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 8))]
        hyp = [w for w in ref if rng.random() > 0.2]
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if hyp and op < 0.5:
                hyp[rng.randrange(len(hyp))] = rng.choice(vocab)
            else:
                hyp.insert(rng.randint(0, len(hyp)), rng.choice(vocab))
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp))
    c = error_counts(refs, hyps)
    assert c["word_errors"] == sum(_edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    assert c["char_errors"] == sum(_edit_distance(list(r), list(h)) for r, h in zip(refs, hyps))
    assert c["words"] == sum(len(r.split()) for r in refs) and c["chars"] == sum(len(r) for r in refs)
    # the split is consistent: S + D + I are the errors, insertions minus deletions the length change
    assert c["substitutions"] + c["deletions"] + c["insertions"] == c["word_errors"]
    assert c["insertions"] - c["deletions"] == sum(len(h.split()) - len(r.split()) for r, h in zip(refs, hyps))
    wer, cer = rates(c)
    assert wer == pytest.approx(jiwer.wer(refs, hyps)) and cer == pytest.approx(jiwer.cer(refs, hyps))
    assert 0.05 < wer < 0.9  # the generator really made errors, and not only errors


def test_frequent_errors_name_each_word_and_rank_by_count():
    refs = ["the cat sat", "the cat ran", "a dog", "", "one two three"]
    hyps = ["the bat sat", "the bat ran", "a dog barked", "um", "one too tree"]
    errs = frequent_errors(refs, hyps)
    assert errs[0] == {"ref": "cat", "hyp": "bat", "count": 2}
    # a two-word substitution counts word by word; an insertion has an empty ref
    assert sorted((e["ref"], e["hyp"], e["count"]) for e in errs[1:]) == [
        ("", "barked", 1), ("", "um", 1), ("three", "tree", 1), ("two", "too", 1)]
    assert frequent_errors(refs, hyps, top=1) == errs[:1]
    # the listed errors add up to the counted ones
    assert sum(e["count"] for e in errs) == error_counts(refs, hyps)["word_errors"]


def test_frequent_errors_list_deletions_with_an_empty_hyp():
    errs = frequent_errors(["play the song now", "play the song"], ["play song", "play song"])
    assert errs == [{"ref": "the", "hyp": "", "count": 2}, {"ref": "now", "hyp": "", "count": 1}]
    assert frequent_errors(["", ""], ["hi", "hi there"]) == [
        {"ref": "", "hyp": "hi", "count": 2}, {"ref": "", "hyp": "there", "count": 1}]
    assert frequent_errors(["", ""], ["hi", "hi there"], top=1) == [{"ref": "", "hyp": "hi", "count": 2}]
    assert frequent_errors(["same words"], ["same words"]) == []
