"""The job page's "Try it" panel through the real app, with API keys on and the real serving worker.

The jobs are driven by a stand-in launcher (the test records what a trainer would report), each
checkpoint a copy of one LoRA adapter the real trainer wrote (``trained_adapter``, once per
session). The panel offers the job's checkpoints by the ids ``/v1/models`` lists, newest first,
and the base model beside them; the page's script streams both from ``/v1/chat/completions``
signed in by the browser's session cookie and the page's CSRF token, exactly as the calls below
make them. Another tenant's checkpoints never appear, and naming one is the catalogue's 404.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.integration.test_api import ROWS, lora_request
from tests.integration.test_models_api import trained_adapter  # noqa: F401 - the session fixture
from tests.serving_helpers import ALICE, BOB

WORKER = "test-worker"
ORIGIN = "http://testserver"


def _job(client, tiny_model_path: Path, key: str, adapter: Path | None, *, epochs: int = 2, **fields) -> str:
    """A Llama Stack LoRA job of ``key``'s tenant; with ``adapter``, it wrote a copy of it at each
    epoch's end and completed, else it is still scheduled with no checkpoint."""
    headers = {"Authorization": f"Bearer {key}"}
    dataset = f"colours-{key}"
    registered = client.post("/v1/datasets", headers=headers, json={
        "purpose": "post-training/messages", "dataset_id": dataset, "source": {"type": "rows", "rows": ROWS}})
    assert registered.status_code in (200, 409), registered.text
    body = lora_request(str(tiny_model_path), dataset, **fields)
    assert client.post("/v1/post-training/supervised-fine-tune", headers=headers, json=body).status_code == 200
    if adapter is None:
        return body["job_uuid"]
    store = client.services.jobs.store
    job = store.claim_next(owner=WORKER, lease_seconds=60)
    assert job is not None and job.job_uuid == body["job_uuid"]
    for epoch in range(1, epochs + 1):
        folder = Path(job.plan.output_dir) / f"epoch_{epoch}"
        shutil.copytree(adapter, folder)
        store.record_checkpoint(job_id=job.id, owner=WORKER, attempt=job.attempt, identifier=f"{job.job_uuid}-epoch-{epoch}",
                                epoch=epoch, step=2 * epoch, path=str(folder), train_loss=1.0, validation_loss=None,
                                perplexity=None)
    from posttrain.domain.jobs import JobStatus

    store.finish(job_id=job.id, owner=WORKER, attempt=job.attempt, status=JobStatus.COMPLETED)
    return body["job_uuid"]


def _sign_in(client: TestClient, key: str) -> None:
    form = client.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    signed_in = client.post("/ui/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)
    assert signed_in.status_code == 303, signed_in.text


def _csrf(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


def _options(html: str) -> list[tuple[str, bool]]:
    select = re.search(r'<select id="try-model">(.*?)</select>', html, re.S).group(1)
    return [(value, bool(selected)) for value, selected in re.findall(r'<option value="([^"]*)"( selected)?>', select)]


def _browser_headers(token: str | None) -> dict[str, str]:
    """What the page's fetch sends: a same-origin browser call, JSON, the CSRF token (no API key)."""
    headers = {"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json",
               "Accept": "text/event-stream"}
    if token is not None:
        headers["X-CSRF-Token"] = token
    return headers


def _stream(client: TestClient, body: dict, token: str) -> tuple[str, list[str], str | None]:
    """The streamed answer as the page reads it: its text, the raw data lines, the finish reason."""
    text, lines, finish = [], [], None
    with client.stream("POST", "/v1/chat/completions", headers=_browser_headers(token),
                       content=json.dumps(body)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            lines.append(data)
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(text), lines, finish


def test_the_panel_offers_the_jobs_checkpoints_and_base_and_streams_both(keyed_client, tiny_model_path, trained_adapter):  # noqa: F811
    client = keyed_client
    mine = _job(client, tiny_model_path, ALICE, trained_adapter)
    theirs = _job(client, tiny_model_path, BOB, trained_adapter)
    _sign_in(client, ALICE)

    page = client.get(f"/ui/jobs/{mine}")
    assert page.status_code == 200, page.text
    html = page.text
    # The job's checkpoints by their /v1/models ids, the newest selected; the base beside them.
    assert _options(html) == [(f"{mine}-epoch-2", True), (f"{mine}-epoch-1", False)]
    assert f'data-base-model="{tiny_model_path.name}"' in html
    assert f'<code class="try-name" id="try-base-name">{tiny_model_path.name}</code>' in html
    assert 'id="try-none"' not in html
    assert theirs not in html  # another tenant's checkpoints never appear
    listed = {m["id"] for m in client.get("/v1/models").json()["data"]}  # the same cookie, a GET: no token needed
    assert {f"{mine}-epoch-1", f"{mine}-epoch-2", tiny_model_path.name} <= listed
    assert not any(theirs in model_id for model_id in listed)
    # Bob's job page is a 404 to Alice, so his checkpoints are never offered to her.
    assert client.get(f"/ui/jobs/{theirs}").status_code == 404

    # The calls the page's script makes: the same prompt to the checkpoint and to the base, greedy,
    # streamed; each stream is the greedy answer, ends with [DONE], and says why it stopped.
    token = _csrf(html)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour is sky?"}]
    for model in (f"{mine}-epoch-2", tiny_model_path.name):
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": 8, "temperature": 0}
        text, lines, finish = _stream(client, body, token)
        assert lines[-1] == "[DONE]" and finish in ("stop", "length"), lines
        whole = client.post("/v1/chat/completions", headers=_browser_headers(token), json={**body, "stream": False})
        assert whole.status_code == 200, whole.text
        assert text == whole.json()["choices"][0]["message"]["content"]
        assert len(lines) > 2  # the role chunk, then the text came in pieces

    # Without the page's token the session's call is refused (403), before any model is looked up.
    body = {"model": tiny_model_path.name, "messages": messages, "stream": True, "max_tokens": 4}
    refused = client.post("/v1/chat/completions", headers=_browser_headers(None), json=body)
    assert refused.status_code == 403 and "CSRF" in refused.text, refused.text
    # Naming Bob's checkpoint with Alice's session: the catalogue's 404, in OpenAI's envelope.
    missing = client.post("/v1/chat/completions", headers=_browser_headers(token),
                          json={**body, "model": f"{theirs}-epoch-1"})
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["message"] == f"The model '{theirs}-epoch-1' does not exist"


def test_a_job_without_a_checkpoint_shows_no_panel_but_says_why(keyed_client, tiny_model_path):
    client = keyed_client
    job = _job(client, tiny_model_path, ALICE, None)
    _sign_in(client, ALICE)
    html = client.get(f"/ui/jobs/{job}").text
    assert 'id="try-none"' in html and "No checkpoint to chat with yet" in html
    assert 'id="try-form"' not in html and 'id="try-model"' not in html


def test_an_openai_jobs_panel_offers_its_fine_tuned_model_then_its_checkpoints(keyed_client, tiny_model_path,
                                                                              trained_adapter):  # noqa: F811
    from tests.integration.test_models_api import finished_job

    client = keyed_client
    job, _ = finished_job(client, client.services, tiny_model_path, trained_adapter,
                          headers={"Authorization": f"Bearer {ALICE}"}, suffix="colours")
    _sign_in(client, ALICE)
    html = client.get(f"/ui/jobs/{job['id']}").text
    ft = f"ft:{tiny_model_path.name}:colours:{job['id']}"
    assert _options(html) == [(ft, True), (f"{ft}:ckpt-step-4", False), (f"{ft}:ckpt-step-2", False)]
    assert f'data-base-model="{tiny_model_path.name}"' in html


def test_the_panel_shows_ids_as_text(keyed_client, tiny_model_path, trained_adapter):  # noqa: F811
    """A job id is the client's text, and the checkpoint ids hold it: escaped, never markup."""
    client = keyed_client
    job = _job(client, tiny_model_path, ALICE, trained_adapter, epochs=1, job_uuid='<img src=x onerror="alert(1)">')
    _sign_in(client, ALICE)
    html = client.get("/ui/jobs/" + job.replace('"', "%22")).text
    panel = html[html.index('<section id="try-it"'):html.index("</section>", html.index('<section id="try-it"'))]
    assert "<img" not in panel
    escaped = "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;-epoch-1"
    assert f'<option value="{escaped}" selected>{escaped}</option>' in panel


def test_a_base_the_server_does_not_name_leaves_the_checkpoint_alone_in_the_panel(keyed_client, tiny_model_path,
                                                                                  trained_adapter):  # noqa: F811
    """A job trained from a model folder deeper in a model root (allowed, but no base model id names
    it): the panel offers the checkpoints and says why there is no base column."""
    import uuid

    nested = tiny_model_path.parent / f"nested-{uuid.uuid4().hex[:8]}" / "model"
    shutil.copytree(tiny_model_path, nested)
    try:
        job = _job(keyed_client, nested, ALICE, trained_adapter, epochs=1)
        _sign_in(keyed_client, ALICE)
        html = keyed_client.get(f"/ui/jobs/{job}").text
        assert _options(html) == [(f"{job}-epoch-1", True)]
        assert 'data-base-model=""' in html and 'id="try-no-base"' in html and 'id="try-base-answer"' not in html
    finally:
        shutil.rmtree(nested.parent, ignore_errors=True)


def test_on_an_open_server_the_pages_double_submit_token_lets_the_chat_through(client):
    """No API keys: the page's token is the double-submit cookie's, and the chat call passes the
    gate with it (the unknown model's 404 comes from the route) and is refused without it."""
    page = client.get("/ui/jobs/no-such-job")
    token = _csrf(page.text)
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    passed = client.post("/v1/chat/completions", headers=_browser_headers(token), json=body)
    assert passed.status_code == 404 and passed.json()["error"]["message"] == "The model 'no-such-model' does not exist"
    refused = client.post("/v1/chat/completions", headers=_browser_headers("not-the-token"), json=body)
    assert refused.status_code == 403, refused.text


# -- in a real browser ------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _no_browser() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} (Debian's chromium package) is missing"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing"
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_in_a_browser_one_prompt_streams_into_both_columns(tmp_path, tiny_model_path):
    """A real server trains a real tiny job; signed in, the browser picks a checkpoint, types a
    prompt, and sees the checkpoint's and the base's answers stream in side by side: each the
    greedy answer the API gives a client for the same request."""
    missing = _no_browser()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must drive a browser: {missing} (run bash scripts/setup-browser)")
        pytest.skip(f"no browser to drive: {missing} (run bash scripts/setup-browser)")
    import httpx
    from playwright.sync_api import sync_playwright

    from posttrain.demo import colour_rows
    from posttrain.services.access import digest
    from tests.conftest import start_server, stop_server

    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest(ALICE)}\nbob:{digest(BOB)}\n")
    server = start_server(tmp_path, tiny_model_path, extra_env={"POSTTRAIN_API_KEYS_FILE": str(keys)})
    alice = {"Authorization": f"Bearer {ALICE}"}
    try:
        assert server.post("/v1/datasets", headers=alice, json={
            "purpose": "post-training/messages", "dataset_id": "colours",
            "source": {"type": "rows", "rows": colour_rows(repeat=2)}}).status_code == 200
        body = lora_request(str(tiny_model_path), "colours")
        body["training_config"].update(n_epochs=2, max_steps_per_epoch=2)
        body["training_config"]["optimizer_config"].update(lr=2e-2)

        def status() -> dict:
            return server.get("/v1/post-training/job/status", headers=alice, params={"job_uuid": job_uuid}).json()

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
                page.set_default_timeout(30_000)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(server.base_url + "/ui/login")
                page.fill('input[name="api_key"]', ALICE)
                page.click('form.sign-in button[type="submit"]')
                page.wait_for_url(server.base_url + "/")
                assert server.post("/v1/post-training/supervised-fine-tune", headers=alice, json=body).status_code == 200
                job_uuid = body["job_uuid"]

                # Opened before the trainer wrote a checkpoint (it takes seconds to start), the page
                # has no panel, then says when one is ready.
                page.goto(server.base_url + f"/ui/jobs/{job_uuid}")
                if page.locator("#try-none").count():
                    assert "No checkpoint to chat with yet" in page.inner_text("#try-it")
                    page.wait_for_selector("#try-newer", timeout=240_000)
                    assert "A checkpoint is ready" in page.inner_text("#try-newer")
                deadline = time.monotonic() + 300
                while (done := status())["status"] not in ("completed", "failed"):
                    assert time.monotonic() < deadline, done
                    time.sleep(0.5)
                assert done["status"] == "completed", done
                newest, oldest = done["checkpoints"][-1]["identifier"], done["checkpoints"][0]["identifier"]

                page.reload()
                options = page.locator("#try-model option")
                assert options.all_inner_texts() == [newest, oldest]
                assert page.input_value("#try-model") == newest
                assert page.inner_text("#try-base-name") == tiny_model_path.name
                assert page.locator("#try-newer").count() == 0  # nothing newer than the page

                page.fill("#try-message", "What colour is sky?")
                page.fill("#try-max-tokens", "12")
                page.click("#try-send")
                assert page.is_disabled("#try-send")  # until both streams end
                page.wait_for_selector('#try-trained-answer[data-done="true"]', state="attached", timeout=240_000)
                page.wait_for_selector('#try-base-answer[data-done="true"]', state="attached", timeout=60_000)
                answers = {"trained": page.text_content("#try-trained-answer"),
                           "base": page.text_content("#try-base-answer")}
                assert "finish_reason" in page.inner_text("#try-trained-meta")
                assert "finish_reason" in page.inner_text("#try-base-meta")
                page.wait_for_function("() => !document.getElementById('try-send').disabled")
                page.screenshot(path=str(tmp_path / "dashboard-try-it.png"), full_page=True)

                # A refused request: the OpenAI error's message in each column, as text.
                page.fill("#try-max-tokens", "100000")
                page.press("#try-message", "Control+Enter")
                page.wait_for_selector("#try-trained-answer.error")
                page.wait_for_selector("#try-base-answer.error")
                for column in ("#try-trained-answer", "#try-base-answer"):
                    assert "max_tokens" in page.text_content(column), page.text_content(column)
                page.wait_for_function("() => !document.getElementById('try-send').disabled")
                assert not errors, f"JavaScript errors on the page: {errors}"
            finally:
                browser.close()

        # Each column holds the greedy answer a client gets for the same request.
        for column, model in (("trained", newest), ("base", tiny_model_path.name)):
            whole = httpx.post(server.base_url + "/v1/chat/completions", headers=alice, timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "What colour is sky?"}],
                "max_tokens": 12, "temperature": 0})
            assert whole.status_code == 200, whole.text
            assert answers[column] == whole.json()["choices"][0]["message"]["content"], (column, answers)
        assert answers["trained"] and answers["base"], answers
        assert answers["trained"] != answers["base"], answers  # the columns differ by what the job learned
    finally:
        stop_server(server)
