"""The demo dataset that ``posttrain serve --demo`` registers: a small learnable toy task.

Each colour name maps to one fixed answer, so a tiny model's loss falls visibly within a few
epochs; the same rows serve the tests that check that training really learns.
"""

from __future__ import annotations

COLOURS = {
    "sky": "The sky is blue.",
    "grass": "Grass is green.",
    "snow": "Snow is white.",
    "coal": "Coal is black.",
    "blood": "Blood is red.",
    "sun": "The sun is yellow.",
    "orange": "An orange is orange.",
    "violet": "A violet is purple.",
}

DEMO_DATASET_ID = "demo-colours"
DEMO_MODEL_NAME = "tiny-llama"


def colour_rows(repeat: int = 4) -> list[dict[str, str]]:
    """Instruct rows (``input_query``/``expected_answer``), each question asked ``repeat`` times."""
    rows = []
    for _ in range(repeat):
        for thing, answer in COLOURS.items():
            rows.append({"input_query": f"What colour is {thing}?", "expected_answer": answer})
    return rows
