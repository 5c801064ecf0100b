"""The three things users do in the Dagster UI, done in a real headless Chromium.

One `dagster dev` serves all three tests, on a private copy of the trained home. They run in
file order and only add state: reading the adapter's page changes nothing, the Q5_1 run only
adds a quantization, and re-materializing `chat_set` (last) is kept from retraining by the
retrain rate limit. With RUGPT_UPDATE_SCREENSHOTS=1 the tests also refresh docs/img/*.png.
"""

import json
import re
import shutil
import time

import pytest

from rugpt_assets.core.artifacts import StorageLayout
from rugpt_assets_tests.e2e import browser as chromium_browser
from rugpt_assets_tests.e2e.conftest import home_env
from rugpt_assets_tests.e2e.dagster_dev import DagsterDev, dagster_dev

CHROMIUM = chromium_browser.require_chromium()

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 300
QUANT_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
# The UI keeps the asset graph's expanded groups (and a collapsed navigation) in localStorage.
EXPANDED_GRAPH = """
localStorage.setItem('asset-graph-open-graph-nodes-global-__GLOBAL__',
  JSON.stringify({expanded: 'global@global:data,global@global:model,global@global:export'}));
localStorage.setItem('dagster-nav-collapsed', 'true');
"""


@pytest.fixture(scope="module")
def server(trained_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("ui") / "home"
    shutil.copytree(trained_home, home, symlinks=True)
    # Pinned whatever the caller's environment says: re-materializing chat_set must not start
    # a retraining (which would re-export every quantization) while the tests look.
    with dagster_dev(home, {**home_env(home), "RUGPT_MIN_RETRAIN_HOURS": "1000"}) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with chromium_browser.chromium(CHROMIUM) as browser:
        yield browser


@pytest.fixture
def page(browser, request):
    """A fresh browser context per test; a failing test leaves its screenshot and HTML behind."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(60_000)  # two shared cores: the UI can be slow to render
    page = context.new_page()
    yield page
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        chromium_browser.save_failure_artifacts(page, request.node.name)
    context.close()


def run_status(server: DagsterDev, run_id: str) -> str:
    query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
    return server.graphql(query, {"id": run_id})["runOrError"]["status"]


def wait_for_run(server: DagsterDev, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (status := run_status(server, run_id)) not in {"SUCCESS", "FAILURE", "CANCELED"}:
        assert time.monotonic() < deadline, f"run {run_id} {status} after {RUN_TIMEOUT_S} s\n{server.log_tail()}"
        time.sleep(2)
    return status


def materialization_run_ids(server: DagsterDev, asset: str) -> list[str]:
    """Newest first."""
    query = """query($path: [String!]!) {
        assetOrError(assetKey: {path: $path}) { ... on Asset { assetMaterializations { runId } } } }"""
    events = server.graphql(query, {"path": [asset]})["assetOrError"]["assetMaterializations"]
    return [event["runId"] for event in events]


def artifacts(server: DagsterDev) -> StorageLayout:
    return StorageLayout(server.home / "storage" / "artifacts")  # RUGPT_STORAGE_DIR of dagster_dev


def launched_run_id(page) -> str:
    """The run id from the "Launched run … View" toast."""
    view = page.locator("a[href^='/runs/']").filter(has_text=re.compile(r"^View$"))
    return view.get_attribute("href").removeprefix("/runs/")


def graph_node(page, asset: str):
    return page.locator("foreignObject").get_by_text(asset, exact=True)


def assert_run_succeeds(page, server: DagsterDev, run_id: str) -> None:
    """Waits for the run to end, then checks that its page says so too."""
    status = wait_for_run(server, run_id)
    page.goto(f"{server.url}/runs/{run_id}")
    assert status == "SUCCESS", f"run {run_id} ended {status}"
    page.get_by_text("Success", exact=True).first.wait_for()


def test_lora_adapter_page_shows_eval_loss_and_loss_curve(server, page):
    metrics = json.loads((artifacts(server).lora_adapter / "metrics.json").read_text())
    page.goto(f"{server.url}/assets/lora_adapter")

    eval_loss_row = page.locator("tr", has=page.get_by_text("eval_loss", exact=True))
    shown = eval_loss_row.locator("td").last.inner_text()
    assert float(shown) == pytest.approx(metrics["eval_loss"], rel=1e-3)  # shown to 4 significant digits
    if chromium_browser.updating_screenshots():
        page.get_by_text("Metadata", exact=True).first.evaluate("heading => heading.scrollIntoView()")
        chromium_browser.doc_screenshot(page, "lora_adapter_metadata")

    page.locator("tr", has=page.get_by_text("loss_curve", exact=True)).get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    curve = dialog.locator("img[src^='data:image/png;base64,']")
    curve.wait_for()
    assert curve.evaluate("img => img.complete && img.naturalWidth > 0"), "the loss-curve PNG did not decode"
    chromium_browser.doc_screenshot(dialog, "loss_curve")


def test_materialize_one_quantization_partition(server, page):
    page.goto(f"{server.url}/assets/ggml_quantized")
    page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize ggml_quantized")
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem").filter(has=page.get_by_title("Q5_1", exact=True)).click()
    dialog.get_by_text("Launch runs to materialize ggml_quantized").click()  # closes the picker
    dialog.get_by_text("1 partition", exact=True).wait_for()
    chromium_browser.doc_screenshot(dialog, "partition_dialog")
    dialog.get_by_role("button", name="Launch 1 run").click()
    assert_run_succeeds(page, server, launched_run_id(page))

    query = """{ assetNodeOrError(assetKey: {path: ["ggml_quantized"]}) { ... on AssetNode {
        assetPartitionStatuses { ... on DefaultPartitionStatuses {
            materializedPartitions materializingPartitions } } } } }"""
    statuses = server.graphql(query)["assetNodeOrError"]["assetPartitionStatuses"]
    assert set(statuses["materializedPartitions"]) == {"Q5_1"}
    assert statuses["materializingPartitions"] == []
    assert {q for q in QUANT_TYPES if artifacts(server).ggml_quantized(q).exists()} == {"Q5_1"}

    # The f16 asset's newest event is the size/speed/perplexity table, now with a Q5_1 row.
    page.goto(f"{server.url}/assets/ggml_f16?view=events")
    table = page.locator("tr", has=page.get_by_text("quantizations", exact=True))
    table.locator("tr", has=page.get_by_text("Q5_1", exact=True)).wait_for()
    chromium_browser.doc_screenshot(page, "ggml_f16_quantizations")


def test_materialize_chat_set_from_the_asset_graph(server, page):
    before = materialization_run_ids(server, "chat_set")
    page.add_init_script(EXPANDED_GRAPH)
    page.goto(f"{server.url}/asset-groups")
    graph_node(page, "chat_set").click()
    page.get_by_role("link", name="View in Asset Catalog").click()
    page.wait_for_url(re.compile(r"/assets/chat_set(\?|$)"))
    page.get_by_role("button", name="materialization Materialize", exact=True).click()
    run_id = launched_run_id(page)
    assert_run_succeeds(page, server, run_id)

    after = materialization_run_ids(server, "chat_set")
    assert len(after) == len(before) + 1 and after[0] == run_id
    if chromium_browser.updating_screenshots():
        screenshot_whole_graph(page, server)


def screenshot_whole_graph(page, server: DagsterDev) -> None:
    """The graph without the side panel, fitted to the window, one zoom step in (nodes show details)."""
    page.set_viewport_size({"width": 1800, "height": 950})
    page.goto(f"{server.url}/asset-groups")
    graph_node(page, "chat_set").wait_for()
    page.locator("button:has([aria-label=panel_show_right])").click()  # hide the asset list
    page.mouse.dblclick(120, 920)  # double-click on empty canvas: zoom to fit
    page.locator("button:has([aria-label=zoom_in])").click()
    page.wait_for_function("() => !/Loading(\\.\\.\\.|…)|fetching statuses/.test(document.body.innerText)")
    page.wait_for_timeout(1500)  # the zoom animation
    chromium_browser.doc_screenshot(page, "asset_graph")
