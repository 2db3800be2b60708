"""A score_model grader at submit, through the real app over real stores (API keys on, alice and
bob): its judge is a model the submitting tenant may use (a base model of the server, or the
tenant's own fine-tuned model, whose folders the plan pins); an unknown judge and another tenant's
are refused with the same 400, on the OpenAI door and on ours, and nothing is queued."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_api import assert_problem
from tests.integration.test_models_api import finished_job, trained_adapter  # noqa: F401
from tests.integration.test_openai_api import ALICE, BOB, as_, assert_openai_error, create_job, upload
from tests.integration.test_openai_reinforcement import RFT_LINES, _method
from tests.integration.test_reinforcement_endpoint import PATH, ROWS, rft_request
from tests.integration.test_score_model_grader import JUDGE_ID, number_judge  # noqa: F401


def judge(model: str) -> dict:
    return {"type": "score_model", "name": "judge", "model": model, "range": [0, 10],
            "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}]}


def test_a_judge_is_a_model_the_tenant_may_use_and_another_tenants_reads_as_unknown(
        keyed_client, tiny_model_path, trained_adapter, number_judge):  # noqa: F811
    client = keyed_client
    services = client.services
    job, claimed = finished_job(client, services, tiny_model_path, trained_adapter, headers=as_(ALICE), steps=(2,))
    ft = f"ft:{tiny_model_path.name}:alice:{job['id']}"
    alice_file = upload(client, RFT_LINES, headers=as_(ALICE)).json()
    created = create_job(client, tiny_model_path, alice_file["id"], headers=as_(ALICE), method=_method(judge(ft)))
    assert created.status_code == 200, created.text
    plan = services.jobs.get(tenant="alice", job_uuid=created.json()["id"]).plan
    [resolved] = plan.judges
    checkpoint = str(Path(claimed.plan.output_dir, "epoch_1").resolve())
    assert resolved.model == ft and resolved.adapter_path == checkpoint
    assert resolved.base_path == str(tiny_model_path.resolve()) and resolved.tokenizer_path == checkpoint
    pinned = {pin.role: pin.path for pin in plan.pins}
    assert pinned["judge_adapter"] == checkpoint and pinned["judge_model"] == resolved.base_path

    # A base model judges for anyone, inside a multi grader too.
    bob_file = upload(client, RFT_LINES, headers=as_(BOB)).json()
    multi = {"type": "multi", "name": "m", "calculate_output": "j", "graders": {"j": judge(JUDGE_ID)}}
    accepted = create_job(client, tiny_model_path, bob_file["id"], headers=as_(BOB), method=_method(multi))
    assert accepted.status_code == 200, accepted.text
    [base_judge] = services.jobs.get(tenant="bob", job_uuid=accepted.json()["id"]).plan.judges
    assert base_judge.base_path == str(number_judge.resolve()) and base_judge.adapter_path is None

    # Alice's model for bob is refused exactly as a model that does not exist.
    unknown = f"ft:{tiny_model_path.name}:alice:ftjob-000000000000000000000000"
    missing = create_job(client, tiny_model_path, bob_file["id"], headers=as_(BOB), method=_method(judge(unknown)))
    error = assert_openai_error(missing, 400, unknown, "does not exist", param="method.reinforcement.grader.model")
    theirs = create_job(client, tiny_model_path, bob_file["id"], headers=as_(BOB), method=_method(judge(ft)))
    assert theirs.status_code == 400
    assert theirs.json()["error"] == {**error, "message": error["message"].replace(unknown, ft)}
    inside = create_job(client, tiny_model_path, bob_file["id"], headers=as_(BOB),
                        method=_method({**multi, "graders": {"j": judge(ft)}}))
    assert_openai_error(inside, 400, ft, param="method.reinforcement.grader.graders.j.model")
    assert [j.job_uuid for j in services.jobs.list_jobs(tenant="bob")] == [accepted.json()["id"]]

    # Our own door: the same refusal, as an RFC 7807 body naming the field.
    registered = client.post("/v1/datasets", headers=as_(BOB), json={
        "purpose": "post-training/messages", "dataset_id": "bob-rft", "source": {"type": "rows", "rows": ROWS}})
    assert registered.status_code == 200, registered.text
    ours = {}
    for name, model in (("theirs", ft), ("unknown", unknown)):
        response = client.post(PATH, headers=as_(BOB), json=rft_request(str(tiny_model_path), "bob-rft",
                                                                        grader=judge(model)))
        ours[name] = assert_problem(response, 400, "grader.model", model, "does not exist")
    assert ours["theirs"]["detail"] == ours["unknown"]["detail"].replace(unknown, ft)
    fine = client.post(PATH, headers=as_(BOB), json=rft_request(str(tiny_model_path), "bob-rft",
                                                                grader=judge(JUDGE_ID)))
    assert fine.status_code == 200, fine.text
    assert len(services.jobs.list_jobs(tenant="bob")) == 2
