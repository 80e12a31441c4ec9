"""`geoscrape check` as a user runs it: exit codes and FILE:LINE errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOOD = """\
regions:
  eu: {}
sites:
  - name: docs
    start_urls: ["http://127.0.0.1:8801/index.html"]
    regions: [eu]
    extract:
      fields:
        title: {css: "title::text"}
"""

BAD = {
    "syntax": (GOOD.replace("regions: [eu]", "regions: [eu"), r":7: "),
    "unknown-key": (
        GOOD.replace("    regions: [eu]\n", "    regions: [eu]\n    regoins: [us]\n"),
        ":7: site 'docs': regoins",
    ),
    "undeclared-region": (
        GOOD.replace("regions: [eu]", "regions: [eu, mars]"),
        ":6: site 'docs': regions[1]",
    ),
    "bad-selector": (
        GOOD.replace("title::text", "title::text[[["),
        ":9: site 'docs': extract.fields.title.css",
    ),
}


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoscrape.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(GOOD)
    done = check(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_names_file_and_line(tmp_path: Path, case: str) -> None:
    text, where = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    done = check(path)
    assert done.returncode == 1, done.stderr  # 1: config errors (2 would be a usage error)
    assert f"{path}{where}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
