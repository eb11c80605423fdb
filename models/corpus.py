"""The demo models' corpus: the English fortune cookies of Debian's `fortunes` package.

    apt-get install fortunes        # fortune-mod's data files, BSD licence, ~2.5 MB of text

Each file under /usr/share/games/fortunes is one category ("computers", "science", ...) of
entries separated by lines holding a single '%'. The split into train and held-out parts is
by a hash of the entry's text, so it is the same on every machine and for every run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Not prose: pictures drawn in characters, and stubs of a few lines.
SKIP = {"ascii-art", "translate-me", "pratchett"}
HELDOUT_PERCENT = 5
# The classifier's labels: large categories whose subjects differ, so the task is learnable.
CLASSIFIER_LABELS = ("computers", "people", "politics", "science", "songs-poems")


@dataclass(frozen=True)
class Entry:
    category: str
    text: str

    @property
    def heldout(self) -> bool:
        digest = hashlib.sha1(self.text.encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def _clean(text: str) -> str:
    text = re.sub(r".\x08", "", text)  # nroff overstriking: "_\bw" is an underlined "w"
    text = text.replace("\t", "    ")
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip()


def load_entries(root: Path = FORTUNES_DIR) -> list[Entry]:
    """Every fortune once (the first category it appears in, files in name order)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and "." not in p.name and p.name not in SKIP)
    if not files:
        raise SystemExit(f"no fortune files under {root}: install Debian's 'fortunes' package (apt-get install fortunes)")
    seen: set[str] = set()
    entries = []
    for path in files:
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"^%$", raw, flags=re.M):
            text = _clean(chunk)
            if len(text) >= 20 and text not in seen:
                seen.add(text)
                entries.append(Entry(path.name, text))
    return entries


def split(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    train = [e for e in entries if not e.heldout]
    heldout = [e for e in entries if e.heldout]
    return train, heldout
