"""The README's configuration table names every setting (it once lacked the API key settings)."""

from __future__ import annotations

import re
from pathlib import Path

from posttrain.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_has_a_row_in_the_readme_table():
    # A row starts "| `POSTTRAIN_X` |" or, for a pair, "| `POSTTRAIN_X` / `POSTTRAIN_Y` |".
    first_cells = re.findall(r"^\| (`POSTTRAIN_[^|]*) \|", README.read_text(), flags=re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`(POSTTRAIN_[A-Z0-9_]+)`", cell)}
    missing = [f"POSTTRAIN_{name.upper()}" for name in Settings.model_fields
               if f"POSTTRAIN_{name.upper()}" not in documented]
    assert missing == []
