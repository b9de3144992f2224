"""One Prometheus scrape for the fleet: each replica's `/metrics` text (exposition format 0.0.4) gets a
`replica` label on every sample, and the replicas' texts merge into one, each metric family's HELP / TYPE
lines once with every replica's samples under them (the format wants a family's lines together). Text in,
text out, whatever wrote it (the hand-written `serve.metrics` or prometheus_client)."""
from __future__ import annotations

import re

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_samples(text: str, labels: dict[str, str]) -> str:
    """`text` with `labels` added to every sample line (comments and blank lines unchanged)."""
    extra = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    if not extra:
        return text
    out = []
    for line in text.splitlines():
        m = None if line.startswith("#") else _NAME.match(line)
        if m is None:
            out.append(line)
            continue
        end = m.end()
        if line[end:end + 1] == "{":
            sep = "" if line[end + 1:end + 2] == "}" else ","
            out.append(f"{line[:end + 1]}{extra}{sep}{line[end + 1:]}")
        else:
            out.append(f"{line[:end]}{{{extra}}}{line[end:]}")
    return "\n".join(out) + "\n"


def _families(text: str):
    """(family name, header lines, sample lines) in order; a family starts at its HELP or TYPE line."""
    fams: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = parts[2]
                head = fams.setdefault(current, ([], []))[0]
                if line not in head:
                    head.append(line)
            continue                      # other comments (and OpenMetrics' # EOF) are dropped
        m = _NAME.match(line)
        if m is None:
            continue
        name = current if current is not None and m.group().startswith(current) else m.group()
        fams.setdefault(name, ([], []))[1].append(line)
    return fams


def merge_expositions(texts: list[str]) -> str:
    """One exposition of several (already labelled apart): families in first-seen order, each family's
    header once, then its samples from every text in the order given."""
    merged: dict[str, tuple[list[str], list[str]]] = {}
    for text in texts:
        for name, (head, samples) in _families(text).items():
            h, s = merged.setdefault(name, ([], []))
            h.extend(line for line in head if line not in h)
            s.extend(samples)
    lines = [line for head, samples in merged.values() for line in (*head, *samples)]
    return "\n".join(lines) + "\n" if lines else ""
