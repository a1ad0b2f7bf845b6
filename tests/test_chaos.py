"""CI's share of the kill-anywhere resume command (`python tests/chaos.py --kills 30`, see chaos.py): a torn
checkpoint file, a kill just after the publishing rename, one halfway through pruning, a torn logs.csv line
and a random moment; the run that survives them equals an uninterrupted one bit for bit."""

import json

import chaos


def test_killed_anywhere_the_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys):
    code = chaos.main(
        [
            "--kills",
            "5",
            "--first",
            "torn_entry:3,after_publish:1,half_pruned:1,torn_log:2,timed",
            "--workdir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0, out
    assert summary["kills"] >= 5 and summary["differences"] == 0
    for point in ("torn_entry", "after_publish", "half_pruned", "torn_log"):
        assert f"point {point}" in summary["landings"], summary
