"""Every property test takes its example count from `tests.strategies.examples`, so that
HYPOTHESIS_PROFILE=deep raises all of them to ≥ 1000 while CI keeps its counts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import strategies


def test_no_property_sets_its_count_past_the_profile() -> None:
    direct = [
        f"{path.name}:{text[: m.start()].count(chr(10)) + 1}"
        for path in sorted(Path(__file__).parent.glob("test_*.py"))
        for text in [path.read_text()]
        for m in re.finditer(r"@settings\(\s*max_examples", text)
    ]
    assert direct == [], "use @examples(N) from tests.strategies instead of @settings"


@pytest.mark.parametrize(("deep", "count"), [(False, 30), (True, strategies.DEEP_EXAMPLES)])
def test_examples_follow_the_profile(
    monkeypatch: pytest.MonkeyPatch, deep: bool, count: int
) -> None:
    monkeypatch.setattr(strategies, "DEEP", deep)
    assert strategies.examples(30).max_examples == count
    assert strategies.examples(2000).max_examples == 2000
