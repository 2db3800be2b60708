"""Property: replace any one field of a valid submit or register body with a hostile JSON value
(a lone surrogate, NaN or Infinity, a huge integer, a very long string, deep nesting, a wrong
type) and the answer is below 500; when it is a refusal, nothing was created."""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_api import PREFERENCES, ROWS, dpo_request, lora_request, register
from tests.integration.test_bad_input import post_raw, snapshot, with_raw


def _paths(value, prefix=()) -> list[tuple]:
    """Every field's path in ``value`` (objects and list items, inner and leaf)."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found.append((*prefix, key))
        found.extend(_paths(item, (*prefix, key)))
    return found


HOSTILE = st.one_of(
    st.sampled_from(['"\\ud800"', '"a\\udfffb"', '{"\\udc00": 1}', "NaN", "Infinity", "-Infinity", "1e400",
                     "[" * 70 + "]" * 70, '{"a": ' * 70 + "1" + "}" * 70, "null", "true", "[]", "{}", '""',
                     "-1", "0", "1.5", '"x"', json.dumps("\u00e9" * 300), json.dumps("/" + "a" * 300)]),
    st.integers(min_value=2**63, max_value=10**40).map(str),
    st.integers(max_value=-(2**63) - 1, min_value=-(10**40)).map(str),
    st.text(min_size=256, max_size=2000).map(json.dumps),
)


def _check(client, app_settings, path: str, body: dict, field: tuple, raw: str) -> None:
    before = snapshot(client, app_settings)
    answer = post_raw(client, path, with_raw(copy.deepcopy(body), field, raw))
    assert answer.status_code < 500, (field, raw[:80], answer.text)
    if answer.status_code >= 400:
        problem = answer.json()
        assert problem["status"] == answer.status_code and problem["detail"], problem
        assert snapshot(client, app_settings) == before, (field, raw[:80])


def test_hostile_values_in_every_field_never_500(client, settings, tiny_model_path):
    register(client)
    register(client, "prefs", rows=PREFERENCES)
    bodies = {
        "/v1/post-training/supervised-fine-tune": lora_request(str(tiny_model_path), "toy"),
        "/v1/post-training/preference-optimize": dpo_request(str(tiny_model_path), "prefs"),
        "/v1/datasets": {"purpose": "post-training/messages", "source": {"type": "rows", "rows": ROWS[:2]},
                         "dataset_id": "new-one", "metadata": {"note": "x"}},
    }
    cases = [(path, field) for path, body in bodies.items() for field in _paths(body)]

    @settings_for_property
    @given(case=st.sampled_from(cases), raw=HOSTILE)
    def property_holds(case, raw):
        path, field = case
        _check(client, settings, path, bodies[path], field, raw)

    property_holds()


settings_for_property = settings(max_examples=80, deadline=None, database=None,
                                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
