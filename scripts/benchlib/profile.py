"""Summarise a py-spy `--format raw` profile (collapsed stacks): where the time goes.

    .venv/bin/python scripts/benchlib/profile.py PROFILE.txt [--top 25] [--match mailtrio/]

Prints the share of samples per function by self time (the innermost frame) and by inclusive
time (anywhere on the stack), the latter restricted to frames whose file matches `--match`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    line = m.group("line")
    return f"{m.group('func')} ({path}{':' + line if line else ''})"


def summarise(path: Path, top: int, match: str) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        # drop the thread/process label py-spy puts first
        if frames and not _FRAME.match(frames[0].strip()):
            frames = frames[1:]
        if not frames:
            continue
        self_time[_short(frames[-1])] += count
        seen: set[str] = set()
        for f in frames:
            if match in f:
                s = _short(f)
                if s not in seen:
                    seen.add(s)
                    inclusive[s] += count
    if total == 0:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples", "", f"top {top} by self time:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    out += ["", f"top {top} by inclusive time (frames matching {match!r}):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="mailtrio/")
    args = p.parse_args(argv)
    for prof in args.profiles:
        print(summarise(prof, args.top, args.match))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
