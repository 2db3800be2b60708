"""The public names of trained models: built and parsed from the right, so a base name holding
``:`` or ``/`` still yields its job and step."""

from __future__ import annotations

import pytest

from posttrain.services.model_names import checkpoint_model_id, fine_tuned_model_id, parse_fine_tuned


@pytest.mark.parametrize("base", ["tiny-llama", "org/name", "odd:name"])
@pytest.mark.parametrize("suffix", [None, "colours"])
def test_a_name_parses_back_to_its_job_and_step(base, suffix):
    ft = fine_tuned_model_id(base=base, suffix=suffix, tenant="alice", job_uuid="ftjob-abc")
    assert ft == f"ft:{base}:{suffix or 'alice'}:ftjob-abc"
    parsed = parse_fine_tuned(ft)
    assert parsed is not None and (parsed.fine_tuned, parsed.job_uuid, parsed.step) == (ft, "ftjob-abc", None)
    checkpoint = parse_fine_tuned(checkpoint_model_id(ft, 12))
    assert checkpoint is not None and (checkpoint.fine_tuned, checkpoint.job_uuid, checkpoint.step) == \
        (ft, "ftjob-abc", 12)


@pytest.mark.parametrize("name", ["tiny-llama", "ft:", "ft:a:b", "ft::b:c", "ft:a:b:", "x:ft:a:b:c"])
def test_other_names_are_not_fine_tuned_names(name):
    assert parse_fine_tuned(name) is None
