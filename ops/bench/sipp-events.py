#!/usr/bin/env python3
"""What a sipp -trace_err log says went wrong, by kind, most frequent first.

Usage: sipp-events.py FILE [TOP] [INDENT]  (TOP kinds, default 8; INDENT spaces, default 2).
Used by ops/bench/sip.sh and ops/bench/hostile.sh to summarise sipp's error logs.
"""
import collections
import re
import sys

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 8
indent = " " * (int(sys.argv[3]) if len(sys.argv) > 3 else 2)
text = open(path, errors="replace").read()
kinds = collections.Counter()
for m in re.finditer(r"(Aborting call on unexpected message for Call-Id '[^']*': while (?:expecting '([^']*)'|pausing) "
                     r"\(index (\d+)\), received '([^\r\n]*)"
                     r"|Continuing call on unexpected message for Call-Id '[^']*': while (?:expecting '([^']*)'|pausing) "
                     r"\(index (\d+)\), received '([^\r\n]*)"
                     r"|Aborting call on an unexpected (\w+)"
                     r"|receive timeout on message [^:]*:(\d+)"
                     r"|Dead call \S+ \(([^)]*)\), received '([^\r\n]*)"
                     r"|Discarding message which can't be mapped)", text):
    g = m.groups()
    if g[3] is not None:
        kinds[f"call failed: unexpected '{g[3]}' at index {g[2]} (waiting for {g[1] or 'pause'})"] += 1
    elif g[6] is not None:
        kinds[f"call went on: unexpected '{g[6]}' at index {g[5]} (waiting for {g[4] or 'pause'})"] += 1
    elif g[7]:
        kinds[f"call failed: unexpected {g[7]}"] += 1
    elif g[8]:
        kinds[f"call failed: receive timeout at index {g[8]}"] += 1
    elif g[9]:
        kinds[f"late '{g[10]}' for a call already {g[9]}"] += 1
    else:
        kinds["message for no call"] += 1
for k, n in kinds.most_common(top):
    print(f"{indent}{n:6d}  {k}")
