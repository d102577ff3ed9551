"""The bad-input walk: every case of ``tests/bad_inputs.py``, timed, in a table and a JSON file.

Each case must exit with status 2, print exactly one ``adaptprune: error:`` line on stderr, write
nothing, and finish within ``--limit`` seconds. By default the cases run in this process after one
measured start-up (``python -m adaptprune.cli --help`` in a fresh process: interpreter and imports), and
a case's time as a user sees it is that start-up plus its own seconds; ``--subprocess`` runs every case
as its own process instead (slow on a loaded machine: each pays the imports). Prints a table and writes
JSON (atomically). With ``--fuzz-report`` (the file ``ADAPTPRUNE_FUZZ_REPORT`` made the fuzz
tests write) it also counts the fuzz cases, their seconds and the distinct one-line messages they reached.

    python scripts/bad_input_walk.py --out docs/bad_input_walk.json [--fuzz-report /tmp/fuzz.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.bad_inputs import BAD_INPUTS, NEW_BAD_INPUTS, expand, make_folders, run_case  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bad_input_walk.json", help="JSON output (default %(default)s)")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds a case may take (default %(default)s)")
    parser.add_argument("--fuzz-report", default=None, help="the fuzz tests' ADAPTPRUNE_FUZZ_REPORT file")
    parser.add_argument("--only", default="", help="comma list of case names (default: all)")
    parser.add_argument("--subprocess", action="store_true", help="run every case as its own process")
    return parser.parse_args(argv)


def run_one(argv: list[str], own_process: bool) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of one case, in its own process or in this one."""
    start = time.perf_counter()
    if not own_process:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_case(argv)
        return code, err.getvalue(), time.perf_counter() - start
    command = [sys.executable, "train_prune.py", *argv[1:]] if argv[0] == "train_prune.py" else None
    command = command or [sys.executable, "-m", "adaptprune.cli", *argv]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stderr, time.perf_counter() - start


def startup_seconds() -> float:
    """Wall seconds of ``python -m adaptprune.cli --help`` in a fresh process: what every command pays first."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "adaptprune.cli", "--help"], cwd=ROOT, env={**os.environ, **ENV},
                   capture_output=True, check=True)  # fmt: skip
    return time.perf_counter() - start


def walk(cases: dict, folders: dict, base: Path, limit: float, group: str, startup: float | None) -> list[dict]:
    """Run ``cases``; ``startup`` None: each in its own process, else in this one plus ``startup`` seconds."""
    rows = []
    for name, (template, needles) in cases.items():
        out = base / f"out-{len(rows)}-{group}"
        code, stderr, case_seconds = run_one(expand(template, folders, out), own_process=startup is None)
        seconds = case_seconds + (startup or 0.0)
        lines = [line for line in stderr.splitlines() if line.strip()]
        line = lines[-1] if lines else ""
        ok = code == 2 and len(lines) == 1 and line.startswith("adaptprune: error: ")
        ok = ok and all(n in line for n in needles) and not out.exists()  # the contract; the time is apart
        rows.append({"group": group, "case": name, "exit": code, "lines": len(lines), "wrote": out.exists(),
                     "ok": ok, "case_s": round(case_seconds, 2), "seconds": round(seconds, 2),
                     "within_limit": seconds <= limit, "message": line})  # fmt: skip
        print(f"{'ok ' if ok else 'BAD'} {group:3} {case_seconds:6.2f}s (+start-up {seconds - case_seconds:.1f}s) "
              f"exit {code} {name:42} {line[19:100]}", flush=True)  # fmt: skip
    return rows


def message_kind(line: str) -> str:
    """A message with its values (paths, quoted text, numbers) blanked: one kind per distinct message."""
    line = re.sub(r"(/tmp|/work|/root)\S*", "PATH", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'X'", line)
    return re.sub(r"\d[\d,.]*", "N", line)


def fuzz_summary(path: Path) -> dict:
    cases = json.loads(path.read_text(encoding="utf-8"))
    errors = [c["error"] for c in cases if c["error"]]
    by_command: dict[str, dict[str, int]] = {}
    for c in cases:
        counts = by_command.setdefault(c["argv"][0], {"exit_0": 0, "exit_2": 0})
        counts[f"exit_{c['code']}"] = counts.get(f"exit_{c['code']}", 0) + 1
    return {
        "cases": len(cases),
        "seconds_in_cases": round(sum(c["seconds"] for c in cases), 1),
        "by_command": by_command,
        "distinct_messages": len({message_kind(e) for e in errors}),
        "distinct_messages_raw": len(set(errors)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    base = Path(tempfile.mkdtemp(prefix="bad-input-walk-"))
    folders = make_folders(base)
    os.environ.update(ENV)
    if not args.subprocess:
        from transformers.utils import logging

        logging.disable_progress_bar()
    startup = None if args.subprocess else startup_seconds()
    load_at_start = os.getloadavg()
    rows = []
    for group, cases in (("old", BAD_INPUTS), ("new", NEW_BAD_INPUTS)):
        chosen = {k: v for k, v in cases.items() if not only or k in only}
        rows += walk(chosen, folders, base, args.limit, group, startup)
    result = {
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "cpus": os.cpu_count(),
        "mode": "subprocess per case" if args.subprocess else "in-process after one measured start-up",
        "startup_s": None if startup is None else round(startup, 2),
        "limit_s": args.limit,
        "cases": len(rows),
        "ok": sum(r["ok"] for r in rows),
        "within_limit": sum(r["within_limit"] for r in rows),
        "max_case_s": max(r["case_s"] for r in rows),
        "max_seconds": max(r["seconds"] for r in rows),
        "rows": rows,
    }
    if args.fuzz_report:
        result["fuzz"] = fuzz_summary(Path(args.fuzz_report))
    out = Path(args.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(
        f"{result['ok']}/{result['cases']} cases keep the contract; {result['within_limit']} within {args.limit:g} s "
        f"(start-up {result['startup_s']} s, slowest case {result['max_case_s']} s after it); written {out}"
    )
    return 0 if result["ok"] == result["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
