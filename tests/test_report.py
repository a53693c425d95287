"""report.py's progress lines, the report card's busy time, its win-rate ceiling and its hardware line."""

import report
from report import Progress, busy_seconds


def test_eta_after_a_slow_first_step_counts_from_the_first_line(monkeypatch, capsys):
    clock = iter([0.0, 60.0, 70.0, 80.0])  # start; step 1 ends after a minute of compilation; then 1 s a step
    monkeypatch.setattr(report.time, "time", lambda: next(clock))
    progress = Progress(total_steps=100, every=10)
    for step in (0, 10, 20):
        progress.line(step, loss=1.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("eta  5940s")  # one line only: the average of all steps so far is all there is
    assert lines[1].endswith("eta    89s")  # 10 s for 10 steps, 89 steps to go
    assert lines[2].endswith("eta    79s")


def test_busy_seconds_counts_overlapping_stages_once():
    timings = [{"seconds": 10, "started": 100, "finished": 110}, {"seconds": 6, "started": 104, "finished": 110},
               {"seconds": 3, "started": 200, "finished": 203}, {"seconds": 7}]
    assert busy_seconds(timings) == 10 + 3 + 7
    assert busy_seconds([{"seconds": 4}, {"seconds": 5}]) == 9
    nested_and_unsorted = [{"seconds": 5, "started": 105, "finished": 110}, {"seconds": 20, "started": 100, "finished": 120},
                           {"seconds": 2, "started": 101, "finished": 103}]
    assert busy_seconds(nested_and_unsorted) == 20


def test_ideal_ceiling_reads_sft_replies_and_skips_replies_to_another_suite(tmp_path, capsys):
    import world
    assert report.ideal_ceiling(tmp_path) is None  # 01 has not run
    tasks = world.eval_suite()
    (tmp_path / "sft").mkdir()
    ideal_twice = [t.ideal + world.END for t in tasks for _ in range(2)]
    report.write_json(tmp_path / "sft" / "eval_texts.json", ideal_twice)
    assert report.ideal_ceiling(tmp_path) == (0.5, 1.0)  # SFT already perfect: all ties
    report.write_json(tmp_path / "sft" / "eval_texts.json", ideal_twice[:-1])
    assert report.ideal_ceiling(tmp_path) is None
    assert "no win-rate ceiling" in capsys.readouterr().out


def test_report_card_counts_the_samples_per_task_from_the_stored_replies(tmp_path):
    import world
    n_tasks = len(world.eval_suite())
    for samples in (1, 3):
        report.write_json(tmp_path / "sft" / "metrics.json", {"preset": "test", "gold_score": 0.5})
        report.write_json(tmp_path / "sft" / "eval_texts.json", ["x" + world.END] * (n_tasks * samples))
        report.build_report(tmp_path)
        card = (tmp_path / "report.md").read_text()
        assert f"{n_tasks} fixed tasks, {samples} sample{'s' if samples > 1 else ''} each" in card


def test_write_json_is_atomic_and_follows_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        report.write_json(tmp_path / "metrics.json", {"a": 1})
        report.write_json(tmp_path / "metrics.json", {"a": 2})  # over an existing file
    finally:
        os.umask(old)
    assert report.read_json(tmp_path / "metrics.json") == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


def test_the_hardware_line_names_the_cpu_model_where_linux_tells_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n")
    assert report.cpu_name(cpuinfo).startswith("AMD EPYC 9B14 (")
    missing = report.cpu_name(tmp_path / "no such file")  # not Linux: the architecture, as before
    assert missing and "EPYC" not in missing
