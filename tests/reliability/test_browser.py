"""The finished run's pages as a person opens them: headless Chromium (Debian's ``chromium``, which
``make test`` installs when missing) driven by Playwright through the Prefect flow run page and the
MLflow model version page of the production-shaped stack's first run.

Screenshots go to the test's tmp folder; ``TUNELINE_SCREENSHOTS=docs pytest tests/reliability/test_browser.py``
writes them to ``docs/`` instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flows.cli import REPO
from helpers import newest_flow_run
from prod_stack import client_of

pytestmark = pytest.mark.services
CHROMIUM = "/usr/bin/chromium"
# No background connections (this machine's network is closed), no sandbox (root in CI).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def shots(tmp_path: Path) -> Path:
    where = os.environ.get("TUNELINE_SCREENSHOTS")
    return (REPO / where) if where else tmp_path


def prefect_login(page, cfg, tmp_path: Path) -> None:
    """Log in as a person does: the UI asks for the server's auth string before it shows anything."""
    from services.stack import prefect_auth_string, urls

    page.goto(urls(cfg)["prefect_ui"])
    field = page.locator("input[type=password]")
    try:
        field.wait_for(timeout=60_000)
    except Exception:
        page.screenshot(path=str(tmp_path / "no-login.png"))
        raise AssertionError(f"no login form; the page shows: {page.inner_text('body')[:800]}") from None
    field.fill(prefect_auth_string(cfg))
    field.press("Enter")
    field.wait_for(state="detached", timeout=30_000)


def test_the_prefect_flow_run_page_tells_the_story_of_the_run(prod_stack, first_run, browser, tmp_path):
    from services.stack import urls

    run = first_run.runs[0]
    name, version = first_run.model_name, run["summary"]["version"]["version"]
    with client_of(prod_stack["env"]):
        recorded = newest_flow_run(f"model:{name}")
    assert re.fullmatch(rf"{re.escape(name)}-lora-\d{{4}}-\d{{2}}-\d{{2}}-\d{{4}}", recorded.name), recorded.name
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    prefect_login(page, prod_stack["cfg"], tmp_path)
    page.goto(f"{urls(prod_stack['cfg'])['prefect_ui']}/runs/flow-run/{run['flow_run_id']}")
    # The run is named and tagged after what it trained.
    try:
        page.get_by_text(recorded.name, exact=True).first.wait_for(timeout=60_000)
    except Exception:
        page.screenshot(path=str(tmp_path / "failed.png"))
        raise AssertionError(f"{recorded.name} not on the page; it shows: {page.inner_text('body')[:1500]}") from None
    for tag in (f"model:{name}", "method:lora", "task:sft", "manual"):
        assert page.get_by_text(tag, exact=True).first.is_visible(), tag
    # The Logs tab (open by default) has the steps' own lines, not only Prefect's.
    page.get_by_text(re.compile(r"^validate: \d+ chat records pass \d+ rules$")).first.wait_for(timeout=30_000)
    assert page.get_by_text(re.compile(r"^evaluate candidate: perplexity")).count() >= 1
    page.screenshot(path=str(shots(tmp_path) / "prefect-flow-run.png"))

    # The Artifacts tab: a page per step, the evaluation and the promotion decision.
    page.get_by_text("Artifacts", exact=True).first.click()
    for key in ("scrub", "evaluation", "promotion"):
        page.get_by_text(f"{name}-{key}", exact=True).first.wait_for(timeout=30_000)
    page.get_by_text(f"{name}-promotion", exact=True).first.click()
    page.get_by_text(re.compile(r"^Promotion: promoted")).first.wait_for(timeout=30_000)
    link = page.get_by_role("link", name="model version")
    assert link.get_attribute("href").endswith(f"#/models/{name}/versions/{version}?workflowType=machine_learning")
    page.screenshot(path=str(shots(tmp_path) / "prefect-promotion-artifact.png"))
    page.close()


def test_the_mlflow_version_page_shows_the_card_the_alias_and_the_link_back(prod_stack, first_run, browser,
                                                                              tmp_path):
    from services.stack import urls

    env, run = prod_stack["env"], first_run.runs[0]
    name, version = first_run.model_name, run["summary"]["version"]["version"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, http_credentials={
        "username": env["MLFLOW_TRACKING_USERNAME"], "password": env["MLFLOW_TRACKING_PASSWORD"]})
    page = context.new_page()
    page.goto(f"{urls(prod_stack['cfg'])['mlflow']}/#/models/{name}/versions/{version}?workflowType=machine_learning")
    # The model card (the version's description) with its evaluation table and the gate's decision.
    page.get_by_text("Promotion decision", exact=True).first.wait_for(timeout=60_000)
    assert page.get_by_text(re.compile(r"^@\s*champion$")).first.is_visible()  # the alias
    assert page.get_by_text(re.compile(r"^@\s*challenger$")).count() == 0  # it left the version at promotion
    assert page.get_by_text(re.compile(r"^promoted: perplexity")).count() >= 1
    page.screenshot(path=str(shots(tmp_path) / "mlflow-model-version.png"), full_page=True)

    # The run: its description links back to the Prefect flow run.
    run_id = run["summary"]["version"]["run_id"]
    reply = context.request.get(f"{urls(prod_stack['cfg'])['mlflow']}/api/2.0/mlflow/runs/get?run_id={run_id}")
    experiment = reply.json()["run"]["info"]["experiment_id"]
    page.goto(f"{urls(prod_stack['cfg'])['mlflow']}/#/experiments/{experiment}/runs/{run_id}"
              "?workflowType=machine_learning")
    page.get_by_text("Model registry", exact=True).first.wait_for(timeout=60_000)  # the model-training view
    back = page.get_by_role("link", name=re.compile(rf"^{re.escape(name)}-lora-"))
    back.first.wait_for(timeout=60_000)
    assert back.first.get_attribute("href").endswith(f"/runs/flow-run/{run['flow_run_id']}")
    page.screenshot(path=str(shots(tmp_path) / "mlflow-run.png"))
    context.close()

