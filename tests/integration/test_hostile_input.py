"""Hostile input: schemathesis generates valid and invalid requests for every operation of our
own OpenAPI document and sends them through the real app on a real SQLite store.

Every answer must be documented (status, content type, body schema), no answer may be a 500,
every error must be an RFC 7807 body, and a refused request must create nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import func, select

from posttrain.api.app import create_app
from posttrain.api.problems import speaks_openai
from posttrain.services.container import build_services
from posttrain.settings import Settings
from posttrain.store.tables import datasets, jobs

_home = Path(tempfile.mkdtemp(prefix="posttrain-hostile-"))
_services = build_services(Settings(home=_home, file_roots=[_home / "files"], model_roots=[_home / "models"]))
app = create_app(services=_services)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)

pytestmark = pytest.mark.filterwarnings("ignore")


def _counts() -> tuple[int, int]:
    with _services.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(jobs)).scalar_one(),
                conn.execute(select(func.count()).select_from(datasets)).scalar_one())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_survives_generated_input(case):
    before = _counts()
    response = case.call()
    # A schema-valid body may still be refused for what a schema cannot say (no such model or
    # dataset, n_epochs 0): that 400 is right, so the "valid data must be accepted" check is off.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and speaks_openai(case.formatted_path):
        error = response.json()["error"]  # OpenAI's envelope on its paths
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif response.status_code >= 400:
        body = response.json()
        assert set(body) <= {"status", "title", "detail", "instance"} and body["status"] == response.status_code
        assert isinstance(body["title"], str) and isinstance(body["detail"], str) and body["detail"]
        assert _counts() == before, "a refused request changed the store"
