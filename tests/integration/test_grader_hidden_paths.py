"""A GRPO job's python grader cannot read the server's data folder: the server's settings name what
to hide, the launcher writes it into the trainer's spec, and the job's scorer hands it to the sandbox."""

from __future__ import annotations

import shutil

import pytest

from posttrain.settings import Settings
from posttrain.trainer.rewards import scorer_for
from posttrain.worker.scheduler import launch_config_from
from tests.integration.test_grader_sandbox import data_folder  # noqa: F401 - a fixture: a folder outside /tmp

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is not installed")

READS_THE_STORE = """
def grade(sample, item):
    return 1.0 if open(item["secret_path"]).read() == "tenant secrets" else 0.5
"""


def test_the_launch_config_hides_the_data_folder_and_file_roots(tmp_path):
    settings = Settings(home=tmp_path / "home", file_roots=[tmp_path / "files"])
    hidden = launch_config_from(settings).grader_hidden_paths
    assert str(settings.resolved_home) in hidden
    assert str((tmp_path / "files").resolve()) in hidden


def test_the_jobs_scorer_hides_what_the_spec_names(data_folder):  # noqa: F811 - the fixture
    home = data_folder  # not under /tmp: the sandbox gives the grader a fresh /tmp anyway
    secret = home / "posttrain.db"
    grader = {"type": "python", "name": "snoop", "source": READS_THE_STORE}
    item = {"secret_path": str(secret)}

    # Control: unhidden, the grader reads the file (so what follows is the hiding, not permissions).
    assert scorer_for(grader)(["x"], [item]).rewards == [1.0]
    hidden = launch_config_from(Settings(home=home)).grader_hidden_paths
    scores = scorer_for(grader, hidden_paths=hidden)(["x"], [item])
    assert scores.rewards == [0.0]
    assert scores.errors[0] and ("FileNotFoundError" in scores.errors[0] or "PermissionError" in scores.errors[0])
