"""Run a measuring command and append what it printed to the results file, with its command, commit, machine
and date, so that every table there says where it came from.

    python -m benchmarks.record --title "Serving, default model" -- python -m benchmarks.serve --seconds 8
    python -m benchmarks.record --title "KJV recipe, test split" -- .venv/bin/nextword-eval build/kjv/model.pt ...

The command's output is shown as it runs and kept as it printed it (its tables are Markdown already). Nothing is
appended when the command fails: the exit status is passed on. ``--results`` names another file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results.md")


def commit() -> str:
    """The checked-out commit, and whether the tree had changes beside it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + (" with uncommitted changes" if dirty else "")


def machine() -> str:
    """The processor, cores, memory and GPU of this machine, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}"


def entry(title: str, command: list[str], output: str, when: datetime.datetime, checkout: str) -> str:
    """The Markdown section appended for one run of ``checkout`` (``commit()`` as it started)."""
    return (
        f"\n## {title}\n\n"
        f"- command: `{shlex.join(command)}`\n"
        f"- commit: {checkout}\n"
        f"- machine: {machine()}\n"
        f"- date: {when.strftime('%Y-%m-%d %H:%M UTC')}\n\n"
        f"{output.rstrip()}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--title", required=True, help="the section's heading in the results file")
    parser.add_argument("--results", default=RESULTS, help="the results file (default benchmarks/results.md)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command that measures")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    when, checkout = datetime.datetime.now(datetime.UTC), commit()  # what runs: commits made meanwhile are not it
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    except OSError as error:
        print(f"benchmarks.record: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
    code = process.wait()
    if code != 0:
        print(f"benchmarks.record: the command exited with status {code}; nothing recorded", file=sys.stderr)
        return code
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(entry(args.title, command, "".join(lines), when, checkout))
    print(f"benchmarks.record: appended to {os.path.relpath(args.results, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
