"""Crash safety (issue 18, item 4), the short version of ``bench/crash.py``: a real ComfyUI server
killed with SIGKILL in the middle of a training run's saves and of a stream of ratings.

Three training trials (a kill right after the last save's state, before its LoRA; one inside a
write; one at a random time), the two replayed outcomes of a kill between a save's files (at the
stage's end and at the last step) and two ratings trials: no partial LoRA, every LoRA file one the
uninterrupted run wrote, no temporary file listed as a LoRA, every state loads and resumes at its
step, and the resumed run ends with the uninterrupted run's LoRA and stage LoRA bit for bit; the
ratings database passes its integrity check and keeps every rating answered 200 before the kill.
``python -m bench.crash`` runs the same with 20 training trials.
"""
from __future__ import annotations

from bench import crash


def test_sigkill_during_saves_and_ratings_leaves_whole_files_that_resume_exactly(tmp_path):
    result = crash.run(trials=3, ratings_trials=2, seed=0, base=tmp_path / "base", out=lambda *_: None)
    report = crash.tables(result)
    assert not crash.failures(result), "\n".join(crash.failures(result)) + "\n" + report
    s = result["summary"]
    assert s["trials"] == 3 and s["partial_files"] == 0 and s["temp_files_listed"] == 0, report
    assert s["resumes_ok"] == s["equal_to_uninterrupted"] == 3, report
    assert s["replayed"] == s["replayed_resumes_ok"] == s["replayed_equal"] == 2, report
    assert s["ratings_acknowledged"] > 0 and s["ratings_kept"] == s["ratings_acknowledged"], report
    assert s["ratings_integrity_ok"] == s["ratings_listed_after_restart"] == 2, report
