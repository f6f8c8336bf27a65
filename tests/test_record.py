"""benchmarks.record: a measuring command's output is appended to the results file with where it came from."""

import sys

from benchmarks.record import main


def test_a_run_is_appended_with_its_command_commit_machine_and_date(tmp_path, capsys):
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    table = "| a | b |\\n| --- | --- |\\n| 1 | 2 |"
    assert main(["--title", "A table", "--results", str(results), "--", sys.executable, "-c", f"print('{table}')"]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\n## A table\n")
    assert "- command: `" in text and "print(" in text
    assert "- commit: " in text and "- machine: " in text and " cores" in text and "- date: 20" in text
    assert text.rstrip().endswith("| 1 | 2 |")
    assert "| a | b |" in capsys.readouterr().out  # shown as it runs


def test_a_failed_command_records_nothing_and_passes_its_status_on(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    assert main(["--title", "t", "--results", str(results), "--", sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert results.read_text() == "# Results\n"


def test_the_commit_recorded_is_the_one_checked_out_when_the_command_started(tmp_path, monkeypatch):
    """A long measurement may outlive a commit made meanwhile; its figures are the checkout's it started from."""
    import benchmarks.record as record

    ran = tmp_path / "ran"  # the command leaves it: a commit() read after the run sees it
    monkeypatch.setattr(record, "commit", lambda: "def456 (made meanwhile)" if ran.exists() else "abc123 (at start)")
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    command = f"import pathlib; pathlib.Path({str(ran)!r}).touch(); print('x')"
    assert main(["--title", "t", "--results", str(results), "--", sys.executable, "-c", command]) == 0
    assert "- commit: abc123 (at start)" in results.read_text()
