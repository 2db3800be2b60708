"""The dashboard, end to end: a real server process trains a real tiny job while headless Chromium
(Debian's ``chromium``, driven by Playwright) watches its loss curve grow, sees its checkpoints,
cancels a second job from its page, pauses and resumes a third, and previews a dataset's rows.

Needs /usr/bin/chromium and the ``playwright`` package (``bash scripts/setup-browser`` installs
both); without them the module is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from posttrain.demo import colour_rows
from tests.conftest import start_server, stop_server
from tests.integration.test_api import lora_request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOT_DIR", "/tmp"))
TERMINAL = {"completed", "failed", "cancelled"}


def _missing() -> list[str]:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (Debian's chromium package)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    return missing


if _missing() and not os.environ.get("CI"):
    pytest.skip(f"no browser to drive ({', '.join(_missing())} missing): run bash scripts/setup-browser",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path):
    """A real ``posttrain serve`` process with its local worker, serving the dashboard."""
    home = tmp_path_factory.mktemp("dashboard-home")
    live = start_server(home, tiny_model_path)
    try:
        if live.get("/ui/datasets").status_code != 200:
            pytest.fail("the server does not serve the dashboard: "
                        "api/app.py must include posttrain.dashboard.routes.router")
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def browser():
    if _missing():
        pytest.fail(f"CI must drive a browser, but {', '.join(_missing())} is missing: run bash scripts/setup-browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def colours(server) -> str:
    response = server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "colours-ui",
                                                 "source": {"type": "rows", "rows": colour_rows(repeat=4)}})
    assert response.status_code == 200, response.text
    return "colours-ui"


def _submit(server, dataset_id: str, *, n_epochs: int, max_steps_per_epoch: int) -> str:
    body = lora_request(str(server.tiny_model_path), dataset_id)
    body["training_config"].update(n_epochs=n_epochs, max_steps_per_epoch=max_steps_per_epoch, max_validation_steps=2)
    body["training_config"]["data_config"].update(batch_size=2, shuffle=True)
    body["training_config"]["optimizer_config"].update(lr=2e-2)
    response = server.post("/v1/post-training/supervised-fine-tune", json=body)
    assert response.status_code == 200, response.text
    return body["job_uuid"]


def _points(page) -> int:
    return int(page.get_attribute("#train-curve", "data-points") or 0)


def _wait(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_job_trains_to_the_end_in_the_table_and_on_its_page(server, colours, page):
    job_uuid = _submit(server, colours, n_epochs=5, max_steps_per_epoch=8)

    # The jobs table lists it, then follows it to the end on its own (no reload).
    page.goto(server.base_url + "/")
    row = page.locator(f'#jobs tr[data-job-uuid="{job_uuid}"]')
    row.wait_for()
    assert "LoRA" in row.inner_text() and "tiny-llama" in row.inner_text()
    assert row.locator(".status").inner_text() in ("scheduled", "in_progress")
    row.locator(".status", has_text="completed").wait_for(timeout=240_000)
    events = server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid}).json()["data"]
    steps = {e["data"]["step"] for e in events if e["type"] == "metric"}
    assert len(steps) == max(steps) == 40
    _wait(lambda: row.locator("td").nth(4).inner_text() == "40 / 40", 10, "the progress column to read 40 / 40")

    # Its page: every step on the train-loss curve, a validation point and a checkpoint row per epoch.
    row.locator("a").click()
    page.wait_for_url(f"**/ui/jobs/{job_uuid}")
    assert page.inner_text("h1") == job_uuid
    _wait(lambda: _points(page) == 40, 20, "all 40 steps on the curve")
    assert page.inner_text("#status") == "completed" and page.is_disabled("#cancel")
    assert int(page.get_attribute("#validation-curve", "data-points")) == 5
    rows = page.locator("#checkpoints tbody tr")
    assert rows.count() == 5
    for epoch in range(1, 6):
        cells = rows.nth(epoch - 1).locator("td").all_inner_texts()
        assert cells[0] == str(epoch), cells
        train_loss, validation_loss, perplexity = (float(c) for c in cells[2:5])
        assert train_loss > 0 and validation_loss > 0 and perplexity > 1, cells
        assert cells[5].endswith(f"epoch_{epoch}"), cells
    log = page.inner_text("#log")
    assert "checkpoint epoch 5" in log and "status completed" in log
    page.screenshot(path=str(SCREENSHOTS / "dashboard-job-completed.png"), full_page=True)

    # The JSON summary the table reads.
    done = {j["job_uuid"]: j for j in server.get("/v1/posttrain/jobs").json()["data"]}[job_uuid]
    assert done["status"] == "completed" and done["method"] == "LoRA" and done["kind"] == "sft"
    assert done["checkpoints"] == 5 and done["step"] == done["total_steps"] == 40
    assert done["loss"] > 0 and done["error"] is None and done["completed_at"] >= done["started_at"]


def test_watch_a_long_job_live_then_cancel_it_from_its_page(server, colours, page):
    # Long enough (1600 steps) to watch on any machine; it ends by the button.
    job_uuid = _submit(server, colours, n_epochs=200, max_steps_per_epoch=8)
    page.goto(server.base_url + "/")
    page.locator(f'#jobs tr[data-job-uuid="{job_uuid}"] a').click()
    page.wait_for_url(f"**/ui/jobs/{job_uuid}")

    # The train-loss curve appears and grows while the job trains.
    first = _wait(lambda: _points(page), 120, "the first point of the train-loss curve")
    grown = _wait(lambda: _points(page) > first and _points(page), 60, "the curve to grow")
    assert grown > first and page.inner_text("#status") == "in_progress"

    # A checkpoint row appears as an epoch ends, with its metrics and path; validation gets a point.
    checkpoint = page.locator("#checkpoints tbody tr").first
    checkpoint.wait_for(timeout=120_000)
    cells = checkpoint.locator("td").all_inner_texts()
    assert cells[0] == "1" and all(float(c) > 0 for c in cells[2:5]), cells
    assert cells[5].startswith("/") and cells[5].endswith("epoch_1"), cells
    assert int(page.get_attribute("#validation-curve", "data-points")) >= 1
    assert "checkpoint epoch 1" in page.inner_text("#log")
    page.screenshot(path=str(SCREENSHOTS / "dashboard-job.png"), full_page=True)

    # Cancel: the page and the API say cancelled, and it stays so.
    assert not page.is_disabled("#cancel")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('status').textContent === 'cancelled'", timeout=15_000)
    assert server.job_status(job_uuid)["status"] == "cancelled"
    assert page.is_disabled("#cancel")
    page.wait_for_function("() => document.getElementById('log').textContent.includes('status cancelled')")
    time.sleep(2)
    assert server.job_status(job_uuid)["status"] == "cancelled" and page.inner_text("#status") == "cancelled"
    total = server.get("/v1/posttrain/jobs").json()["data"][0]
    assert total["job_uuid"] == job_uuid and total["status"] == "cancelled" and total["step"] < 1600

    page.goto(server.base_url + "/")
    page.locator(f'#jobs tr[data-job-uuid="{job_uuid}"] .status', has_text="cancelled").wait_for()
    page.screenshot(path=str(SCREENSHOTS / "dashboard-jobs.png"), full_page=True)


def test_datasets_page_previews_rows_as_text(server, colours, page):
    page.goto(server.base_url + "/ui/datasets")
    section = page.locator(f'section.dataset[data-dataset-id="{colours}"]')
    section.wait_for()
    assert "32 rows" in section.inner_text()
    header = section.locator("thead th").all_inner_texts()
    assert header == ["#", "input_query", "expected_answer"]
    rows = section.locator("tbody tr")
    assert rows.count() == 5
    assert rows.first.locator("td").all_inner_texts() == ["0", "What colour is sky?", "The sky is blue."]
    assert "first 5 of 32 rows" in section.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "dashboard-datasets.png"), full_page=True)


def test_user_text_is_shown_as_text_never_run(server, colours, page):
    # Row text and job ids are client text: they must appear literally, never as markup.
    rows = [{"input_query": "<img src=x onerror=window.__pwned=1>", "expected_answer": "<b>x</b>"}]
    dataset_id = "<i>odd</i>"
    assert server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": dataset_id,
                                             "source": {"type": "rows", "rows": rows}}).status_code == 200
    page.goto(server.base_url + "/ui/datasets")
    section = page.locator("section.dataset", has_text="<i>odd</i>")
    assert section.locator("h2").inner_text() == dataset_id
    assert "<img src=x onerror=window.__pwned=1>" in section.inner_text()
    assert section.locator("img, i, b").count() == 0

    body = lora_request(str(server.tiny_model_path), colours, job_uuid='<img src=x onerror="window.__pwned=1">')
    body["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    assert server.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    page.goto(server.base_url + "/")
    page.locator("#jobs tbody tr", has_text="<img src=x").wait_for()
    page.locator("#jobs tbody tr", has_text="<img src=x").locator("a").click()
    page.wait_for_function("() => ['completed', 'failed'].includes(document.getElementById('status').textContent)",
                           timeout=120_000)
    assert page.inner_text("h1") == body["job_uuid"]
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img").count() == 0
    # An unknown job is a tidy 404 page.
    response = page.goto(server.base_url + "/ui/jobs/no-such-job")
    assert response.status == 404 and "No training job 'no-such-job'" in page.inner_text("main")


def test_with_api_keys_a_browser_signs_in_and_follows_its_own_job(tmp_path, tiny_model_path, page):
    """API keys on: the browser is sent to sign in, then the page's own requests (the live job view)
    carry the sign-in cookie; another tenant's job stays out of sight."""
    from posttrain.services.access import digest

    keys = tmp_path / "keys"
    keys.write_text(f"alice:{digest('pt-alice')}\nbob:{digest('pt-bob')}\n")
    server = start_server(tmp_path, tiny_model_path, extra_env={"POSTTRAIN_API_KEYS_FILE": str(keys)})
    try:
        alice, bob = {"Authorization": "Bearer pt-alice"}, {"Authorization": "Bearer pt-bob"}
        jobs = {}
        for key, headers in (("alice", alice), ("bob", bob)):
            assert server.post("/v1/datasets", headers=headers, json={
                "purpose": "post-training/messages", "dataset_id": "colours",
                "source": {"type": "rows", "rows": colour_rows(repeat=2)}}).status_code == 200
            body = lora_request(str(tiny_model_path), "colours")
            body["training_config"].update(n_epochs=1, max_steps_per_epoch=4)
            assert server.post("/v1/post-training/supervised-fine-tune", headers=headers, json=body).status_code == 200
            jobs[key] = body["job_uuid"]

        page.goto(server.base_url + "/")
        page.wait_for_url("**/ui/login")
        page.fill('input[name="api_key"]', "pt-wrong")
        page.click('form.sign-in button[type="submit"]')
        assert "not valid" in page.inner_text("main")
        page.fill('input[name="api_key"]', "pt-alice")
        page.click('form.sign-in button[type="submit"]')
        page.wait_for_url(server.base_url + "/")
        row = page.locator(f'#jobs tr[data-job-uuid="{jobs["alice"]}"]')
        row.wait_for()
        assert page.locator(f'#jobs tr[data-job-uuid="{jobs["bob"]}"]').count() == 0
        row.locator("a").click()
        page.wait_for_url(f"**/ui/jobs/{jobs['alice']}")
        page.wait_for_function("() => document.getElementById('status').textContent === 'completed'",
                               timeout=120_000)
        assert _points(page) == 4  # the curve came from the events API, fetched with the cookie

        page.click("form.sign-out button")
        page.wait_for_url("**/ui/login")
        assert page.goto(server.base_url + f"/ui/jobs/{jobs['alice']}").url.endswith("/ui/login")
    finally:
        stop_server(server)


def _own_status(server, job_uuid: str) -> str:
    return server.get("/v1/post-training/job/events", params={"job_uuid": job_uuid, "after": 10**9}).json()["status"]


def test_pause_and_resume_a_running_job_from_its_page(server, colours, page):
    job_uuid = _submit(server, colours, n_epochs=200, max_steps_per_epoch=8)
    page.goto(server.base_url + f"/ui/jobs/{job_uuid}")
    _wait(lambda: _points(page), 120, "the job to train its first step")
    assert page.is_visible("#pause") and not page.is_visible("#resume")

    page.click("#pause")
    page.wait_for_function("() => document.getElementById('status').textContent === 'paused'", timeout=30_000)
    assert _own_status(server, job_uuid) == "paused" and server.job_status(job_uuid)["status"] == "scheduled"  # spec's view
    assert page.is_visible("#resume") and not page.is_visible("#pause") and not page.is_disabled("#cancel")
    paused_at = _points(page)

    page.click("#resume")
    page.wait_for_function("() => ['scheduled', 'in_progress'].includes(document.getElementById('status').textContent)")
    _wait(lambda: _points(page) > paused_at, 120, "the resumed job to train on")
    assert _own_status(server, job_uuid) == "in_progress" and page.is_visible("#pause")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('status').textContent === 'cancelled'", timeout=15_000)


def test_a_reinforcement_jobs_page_draws_its_reward_curve_next_to_the_loss(server, page):
    from tests.acceptance.test_reinforcement_own_endpoint import ROWS
    from tests.integration.test_reinforcement_endpoint import PATH, rft_request

    assert server.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "rft-ui",
                                             "source": {"type": "rows", "rows": ROWS}}).status_code == 200
    body = rft_request(str(server.tiny_model_path), "rft-ui",
                       grpo={"num_generations": 2, "max_completion_length": 4, "eval_interval": 1, "eval_samples": 1})
    body["training_config"]["data_config"]["validation_dataset_id"] = "rft-ui"
    assert server.post(PATH, json=body).status_code == 200
    _wait(lambda: server.job_status(body["job_uuid"])["status"] in TERMINAL, 300, "the reinforcement job to end")
    assert server.job_status(body["job_uuid"])["status"] == "completed"
    page.goto(server.base_url + f"/ui/jobs/{body['job_uuid']}")
    _wait(lambda: page.get_attribute("#reward-curve", "data-points") == "2", 20, "both steps on the reward curve")
    assert page.is_visible("#reward-section") and page.get_attribute("#valid-reward-curve", "data-points") == "2"
    assert _points(page) == 2  # the loss curve beside it
    assert page.inner_text("#reward-points") == "2 points"
    page.screenshot(path=str(SCREENSHOTS / "dashboard-reinforcement-job.png"), full_page=True)
