"""bench voices: the training-engine ablation's variants, equal-hours subsets and table."""

import pytest

from hpc_asr.bench import voices
from hpc_asr.data.manifest import Utterance


def _pool():
    return [Utterance(f"{e}{i}", f"{e}{i}.wav", "t", 10.0, "s", e, "v") for i in range(20) for e in voices.ENGINES]


def test_every_variant_trains_on_the_same_hours_equally_shared():
    pool = _pool()
    for name, (engines, _) in voices.VARIANTS.items():
        got = voices.subset(pool, engines, 120.0)
        assert sum(u.duration for u in got) == pytest.approx(120.0, abs=10 * len(engines)), name
        assert {u.engine for u in got} == set(engines), name
        per = [sum(u.duration for u in got if u.engine == e) for e in engines]
        assert max(per) - min(per) <= 10.0, name


def test_leave_one_out_variants_leave_exactly_one_engine_out_and_festival_never_trains():
    out = {n: set(voices.ENGINES) - set(e) for n, (e, _) in voices.VARIANTS.items() if n.startswith("-")}
    assert out == {f"-{e}": {e} for e in ("espeak", "mbrola", "pico")}
    assert set(voices.ENGINES) - set(voices.VARIANTS["+pico"][0]) == {"rhvoice"}  # RHVoice's leave-one-out
    assert all("festival" not in e for e, _ in voices.VARIANTS.values())


def test_a_pool_too_small_for_the_share_is_one_clear_error():
    with pytest.raises(ValueError, match="engine rhvoice: the pool has too little audio"):
        voices.subset([u for u in _pool() if u.engine != "rhvoice" or u.id == "rhvoice0"], voices.ENGINES, 400.0)


def test_table_marks_the_engines_not_trained_on():
    rows = [{"variant": "-pico", "engines": ["espeak", "mbrola", "rhvoice"], "augmented": False, "train_hours": 0.5,
             "festival_wer": 0.6, "dev_wer_by_engine": {"espeak": 0.1, "mbrola": 0.2, "pico": 0.5, "rhvoice": 0.3}}]
    line = voices.table(rows).splitlines()[-1]
    assert line == "| -pico | espeak+mbrola+rhvoice | 0.50 | 60.0 | 10.0 | 20.0 | 50.0* | 30.0 |"


def test_unknown_variant_is_named(capsys):
    with pytest.raises(SystemExit):
        voices.main(["--variants", "espeak,+festival"])
    assert "unknown +festival" in capsys.readouterr().err
