"""Corpus readers -> JSONL manifest: TSV/CSV lists and Kaldi data dirs (wav.scp incl. piped
commands, text, utt2spk, segments), on small fixtures made from real LibriSpeech audio."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import run

from data_prep.readers import main, read_kaldi_dir, read_list
from hpc_asr.data.manifest import read_manifest

FLACS = ["1089/134686/1089-134686-0000.flac", "1089/134686/1089-134686-0001.flac",
         "1089/134691/1089-134691-0000.flac"]


@pytest.fixture
def audio(tmp_path, librispeech_dir) -> list[Path]:
    out = []
    for i, rel in enumerate(FLACS):
        dst = tmp_path / "wav" / f"a{i}" / Path(rel).name
        dst.parent.mkdir(parents=True)
        shutil.copy(librispeech_dir / "test-clean" / rel, dst)
        out.append(dst)
    return out


def seconds(path: Path) -> float:
    return sf.info(str(path)).duration


def test_tsv_list_with_header_relative_paths_and_bad_lines(tmp_path, audio, capsys):
    lst = tmp_path / "corpus.tsv"
    lst.write_text("path\ttext\tspeaker\n"
                   f"wav/a0/{audio[0].name}\tHello, World!\tspk1\n"
                   f"{audio[1]}\tsecond one\n"
                   "wav/none.flac\tmissing audio\tx\n"
                   f"wav/a2/{audio[2].name}\t  \tx\n")
    utts = read_list(lst)
    err = capsys.readouterr().err
    assert [u.id for u in utts] == [audio[0].stem, audio[1].stem]
    assert utts[0].text == "hello world" and utts[0].speaker == "spk1" and utts[1].speaker == ""
    assert utts[0].audio == str(audio[0].resolve())
    assert utts[0].duration == pytest.approx(seconds(audio[0]), abs=1e-3)
    assert "wav/none.flac: unreadable" in err and f"{lst}:5: no transcript words" in err


def test_csv_list_quotes_and_repeated_names(tmp_path, audio):
    twin = tmp_path / "wav" / "b" / audio[0].name
    twin.parent.mkdir()
    shutil.copy(audio[0], twin)
    lst = tmp_path / "corpus.csv"
    lst.write_text(f'wav/a0/{audio[0].name},"yes, that one",s\nwav/b/{audio[0].name},no,s\n')
    utts = read_list(lst)
    assert [u.text for u in utts] == ["yes that one", "no"]
    assert [u.id for u in utts] == [f"wav-a0-{audio[0].stem}", f"wav-b-{audio[0].stem}"]


def test_list_with_one_field_is_one_line_error(tmp_path, audio):
    lst = tmp_path / "bad.tsv"
    lst.write_text(f"{audio[0]}\n")
    proc = run([sys.executable, "-m", "hpc_asr", "prep", "manifest", "tsv", "--list", str(lst), "--out",
                str(tmp_path / "m.jsonl")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {lst}:1: expected path, text[, speaker]; got 1 field(s)")


def test_kaldi_dir_plain_piped_and_utt2spk(tmp_path, audio):
    d = tmp_path / "data" / "train"
    d.mkdir(parents=True)
    (d / "wav.scp").write_text(f"u0 {audio[0]}\nu1 cat {audio[1]} |\nu2 false |\n")
    (d / "text").write_text("u0 HELLO THERE\nu1 piped audio\nu2 broken command\nu3 no recording\n")
    (d / "utt2spk").write_text("u0 s0\nu1 s1\nu2 s1\n")
    out = tmp_path / "m.jsonl"
    assert main(["kaldi", "--dir", str(d), "--out", str(out)]) == 0
    utts = read_manifest(out)
    assert [(u.id, u.text, u.speaker) for u in utts] == [("u0", "hello there", "s0"), ("u1", "piped audio", "s1")]
    assert utts[0].audio == str(audio[0].resolve())
    piped = Path(utts[1].audio)
    assert piped.parent == tmp_path / "m.audio" and piped.name == "u1.wav"
    ref, _ = sf.read(str(audio[1]), dtype="int16")
    np.testing.assert_array_equal(sf.read(str(piped), dtype="int16")[0], ref)


def test_kaldi_dir_segments(tmp_path, audio):
    d = tmp_path / "kd"
    d.mkdir()
    (d / "wav.scp").write_text(f"rec0 {audio[0]}\n")
    (d / "segments").write_text("rec0-a rec0 0.00 1.50\nrec0-b rec0 1.50 -1\nrec0-c rec0 99 100\n")
    (d / "text").write_text("rec0-a first part\nrec0-b the rest\nrec0-c past the end\n")
    utts = read_kaldi_dir(d, tmp_path / "seg")
    assert [u.id for u in utts] == ["rec0-a", "rec0-b"]
    total, sr = sf.read(str(audio[0]), dtype="int16")
    a, _ = sf.read(utts[0].audio, dtype="int16")
    b, _ = sf.read(utts[1].audio, dtype="int16")
    assert len(a) == int(1.5 * sr) and utts[0].duration == 1.5
    np.testing.assert_array_equal(np.concatenate([a, b]), total)


def test_kaldi_dir_without_text_is_one_line_error(tmp_path):
    (tmp_path / "wav.scp").write_text("u0 x.wav\n")
    proc = run([sys.executable, "-m", "hpc_asr", "prep", "manifest", "kaldi", "--dir", str(tmp_path), "--out",
                str(tmp_path / "m.jsonl")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'text'}: missing (a Kaldi data dir needs wav.scp and text)"
