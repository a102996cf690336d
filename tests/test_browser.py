"""A newcomer's first hour, in a real browser: ComfyUI's own frontend, served by a real ComfyUI server with
AnimateDiff-Evolved and this pack, driven by headless Chromium through Playwright.

- every shipped UI workflow loads with no dialog and no load error (frontend 1.49 reports missing nodes and
  models in its error overlay), no node over another (the sizes the frontend gives them), no error from the pack
  in the browser console, and turns into its API twin (`app.graphToPrompt`); with its model files absent, the
  SD1.5 workflow's missing models are offered for download (the overlay's details, in the properties panel);
- the Templates dialog (Comfy.BrowseTemplates) lists, under the pack's name, exactly the UI graphs (not the
  API twins in workflows/api/), each with its thumbnail, and a card opens its graph;
- the TinyVideo Memory Budget + Step Rehash graph, queued with the Run button, shows its clip on the Save
  node and the pack's reports on its nodes (web/streamline.js), none of them clipped.

The browser is the system's Chromium (Debian's /usr/bin/chromium, or $STREAMLINE_CHROMIUM) driven by the
`playwright` Python package without Playwright's own browser download. Without them the browser tests are
skipped and the run says so in capitals; STREAMLINE_REQUIRE_BROWSER=1 (CI, where they could be installed)
makes that a failure. The SD1.5 model files are random-weight ones, named as the workflow names them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from comfy_server import make_base_directory, running_server

pytestmark = [pytest.mark.host, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO_ROOT / "workflows"  # the UI graphs: what the frontend's Templates browser lists for the pack
API_WORKFLOWS = WORKFLOWS / "api"  # their API-format twins (`name_api.json`), kept out of the Templates browser
UI_WORKFLOWS = sorted(p.name for p in WORKFLOWS.glob("*.json"))
ANIMATEDIFF = json.loads((API_WORKFLOWS / "streamline_animatediff_api.json").read_text())
SVD = json.loads((API_WORKFLOWS / "svd_img2vid_streamline_api.json").read_text())
# The DiT workflows (Wan 2.1, LTX-2, HunyuanVideo 1.5) are only loaded here, never run: each file they name is listed
# (an empty file in the models/ folder its `models` entry names), not read; real ones are gigabytes.
LISTED_ONLY = ("wan21_t2v_streamline.json", "ltx2_t2v_streamline.json", "hunyuan15_t2v_streamline.json")
RUN_WORKFLOW = "tinyvideo_budget_rehash.json"
PACK_WEB_PATH = "/extensions/ComfyUI-Streamline/"  # where ComfyUI serves the pack's web/ folder
# ComfyUI lists the templates of a custom node under its folder name (tests/comfy_server.py links the pack so), and
# frontend 1.49 asks for a template's picture at /api/workflow_templates/<folder>/<name>.jpg.
TEMPLATES_PACK = "ComfyUI-Streamline"
TEMPLATE_CARD = '[data-testid^="template-workflow-"]'  # one card per template: template-workflow-<name>
CHROMIUM = os.environ.get("STREAMLINE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_TIMEOUT_MS = 120_000
RUN_TIMEOUT_MS = 300_000
REPORT_WIDGET = "streamline_report"


def browser_problem() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the `playwright` Python package is not installed (pip install playwright; no browser download needed)"
    if not (shutil.which(CHROMIUM) or os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set STREAMLINE_CHROMIUM)"
    return None


class SkipSummary:
    """Says in the session summary, in capitals, that the browser tests did not run."""

    def __init__(self, reason: str):
        self.reason = reason

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("!", f"BROWSER TESTS SKIPPED: {self.reason}", red=True)


class Browser:
    """One Chromium page on the server's frontend, with every console message and page error kept."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url
        self.console: list[tuple[str, str, str]] = []  # (type, text, source url)
        page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.console.append(("pageerror", f"{e.message}\n{e.stack or ''}", "")))

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_function("window.app?.graph && window.app.canvas && window.LiteGraph",
                                    timeout=LOAD_TIMEOUT_MS)
        self.page.wait_for_timeout(2000)  # the first-run template browser opens after the app is up
        self.close_dialogs()

    def dialogs(self) -> list[str]:
        return self.page.evaluate("""() => [...document.querySelectorAll('[role="dialog"]')]
            .filter((d) => d.offsetParent !== null || d.getClientRects().length).map((d) => d.innerText)""")

    def load_errors(self) -> list[str]:
        """The error overlay's text, where shown: frontend 1.49 reports a loaded workflow's missing nodes and models
        there ("N errors found"; the details in the properties panel's Errors tab), not in a dialog."""
        return self.page.evaluate("""() => [...document.querySelectorAll('[data-testid="error-overlay"]')]
            .filter((d) => d.offsetParent !== null || d.getClientRects().length).map((d) => d.innerText)""")

    def close_dialogs(self) -> None:
        for _ in range(5):
            if not self.dialogs():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)
        assert not self.dialogs(), self.dialogs()

    def load(self, workflow: dict, name: str) -> None:
        self.page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                           [workflow, name])
        self.page.wait_for_timeout(1000)  # dialogs open and DOM widgets settle after the promise resolves
        self.page.evaluate("() => window.app.canvas.draw(true, true)")

    def errors(self, since: int = 0) -> tuple[list[str], list[str]]:
        """Console errors and page errors after message `since`: (this pack's: from its served web/ files or
        naming it; the others)."""
        pack, other = [], []
        for kind, text, source in self.console[since:]:
            if kind in ("error", "pageerror"):
                ours = PACK_WEB_PATH in source or PACK_WEB_PATH in text or "streamline" in text.lower()
                (pack if ours else other).append(f"{kind}: {text if ours else text.splitlines()[0]} ({source})")
        return pack, other

    def node_boxes(self) -> list[dict]:
        return self.page.evaluate("""() => window.app.graph.nodes.map((n) => ({
            id: n.id, type: n.type, title: n.title, box: [...n.boundingRect]}))""")

    def screenshot(self, name: str) -> None:
        """The whole graph in view, saved for a person to look at (in the temporary folder)."""
        self.page.evaluate("""() => {
            const canvas = window.app.canvas, el = canvas.canvas;
            const boxes = window.app.graph.nodes.map((n) => n.boundingRect);
            const x0 = Math.min(...boxes.map((b) => b[0])) - 40, y0 = Math.min(...boxes.map((b) => b[1])) - 40;
            const x1 = Math.max(...boxes.map((b) => b[0] + b[2])) + 40;
            const y1 = Math.max(...boxes.map((b) => b[1] + b[3])) + 40;
            canvas.ds.scale = Math.min(el.clientWidth / (x1 - x0), el.clientHeight / (y1 - y0), 1);
            canvas.ds.offset = [-x0, -y0];
            canvas.setDirty(true, true);
        }""")
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(Path(tempfile.gettempdir()) / f"streamline_browser_{name}.png"))

    def reports(self) -> dict[int, dict]:
        """node id -> the report widget's text, and its textarea's heights, for nodes that show one."""
        return {int(k): v for k, v in self.page.evaluate(f"""() => Object.fromEntries(window.app.graph.nodes
            .map((n) => [n.id, n.widgets?.find((w) => w.name === "{REPORT_WIDGET}")])
            .filter(([, w]) => w)
            .map(([id, w]) => [id, {{text: String(w.value ?? ""), scrollHeight: w.inputEl?.scrollHeight,
                                     clientHeight: w.inputEl?.clientHeight}}]))""").items()}

    def focus_node(self, node_id: int) -> None:
        """Zoom to 100% on one node, so its DOM widgets are shown at their real size."""
        self.page.evaluate("""(id) => {
            const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
            const [x, y, w, h] = node.boundingRect, el = canvas.canvas;
            canvas.ds.scale = 1;
            canvas.ds.offset = [el.clientWidth / 2 - (x + w / 2), el.clientHeight / 2 - (y + h / 2)];
            canvas.setDirty(true, true);
            canvas.draw(true, true);
        }""", node_id)
        self.page.wait_for_timeout(500)  # DOM widgets follow the canvas on the next animation frames


def overlaps(boxes: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append(" and ".join(f"{n['title']} ({n['type']} {n['id']}) {n['box']}" for n in (a, b)))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd15_server_files):
    base = make_base_directory(tmp_path_factory.mktemp("comfy-browser"), ANIMATEDIFF["1"]["inputs"]["ckpt_name"],
                               ANIMATEDIFF["2"]["inputs"]["model_name"], sd15_server_files)
    # The SVD workflow is only loaded here, never run: its checkpoint needs to be listed, not read (a
    # loadable random-weight SVD checkpoint is gigabytes).
    (base / "models/checkpoints" / SVD["1"]["inputs"]["ckpt_name"]).write_bytes(b"")
    # The same for the DiT workflows' files (diffusion models, checkpoints, text encoders, VAEs, LoRAs, upscalers).
    for name in LISTED_ONLY:
        for model in json.loads((WORKFLOWS / name).read_text())["models"]:
            (base / "models" / model["directory"]).mkdir(parents=True, exist_ok=True)
            (base / "models" / model["directory"] / model["name"]).write_bytes(b"")
    (base / "input").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (64, 36), (90, 120, 160)).save(base / "input" / SVD["2"]["inputs"]["image"])
    yield from running_server(base)


@pytest.fixture(scope="module")
def browser(request, tmp_path_factory):
    problem = browser_problem()
    if problem:
        if os.environ.get("STREAMLINE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"STREAMLINE_REQUIRE_BROWSER=1 but {problem}")
        if not request.config.pluginmanager.has_plugin("streamline-browser-skip"):
            request.config.pluginmanager.register(SkipSummary(problem), "streamline-browser-skip")
        pytest.skip(f"BROWSER TEST SKIPPED: {problem}")
    from playwright.sync_api import sync_playwright

    server = request.getfixturevalue("server")  # started only when there is a browser to point at it

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1920, "height": 1080})
        try:
            running = Browser(context.new_page(), server.url)
            running.open()
            yield running
        finally:
            context.close()
    other = running.errors()[1]
    if other:  # not the pack's: the frontend without network, its own first-run code; for information
        print("\nbrowser console errors not from the pack:\n  " + "\n  ".join(dict.fromkeys(other)))


def test_shipped_api_workflows_only_use_what_the_server_knows(server):
    """Every node of every shipped API workflow exists on a server with ADE and this pack; every input is one of
    the node's, every required input is given, choices are among the options, numbers within their range."""
    info = server.get("/object_info")
    for path in sorted(API_WORKFLOWS.glob("*_api.json")):
        for node_id, node in json.loads(path.read_text()).items():
            where = f"{path.name} node {node_id} ({node['class_type']})"
            assert node["class_type"] in info, f"{where}: not installed"
            spec = info[node["class_type"]]["input"]
            known = {**spec.get("required", {}), **spec.get("optional", {})}
            assert set(node["inputs"]) <= set(known), f"{where}: unknown inputs {set(node['inputs']) - set(known)}"
            assert set(spec.get("required", {})) <= set(node["inputs"]), f"{where}: missing required inputs"
            for name, value in node["inputs"].items():
                kind, options = known[name][0], (known[name][1] if len(known[name]) > 1 else {})
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    continue  # a link
                if isinstance(kind, list) or kind == "COMBO":
                    choices = kind if isinstance(kind, list) else options.get("options", [])
                    assert value in choices, f"{where}: {name}={value!r} not among {choices}"
                elif kind in ("INT", "FLOAT"):
                    assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {name}={value}"


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_loads_in_the_frontend(browser, name):
    """No missing-nodes or missing-models dialog, no pack error in the console, no two nodes over each other,
    and the frontend makes the API twin of it."""
    workflow = json.loads((WORKFLOWS / name).read_text())
    browser.close_dialogs()
    since = len(browser.console)
    browser.load(workflow, name)
    dialogs, load_errors = browser.dialogs(), browser.load_errors()
    browser.close_dialogs()
    assert not dialogs, f"{name}: the frontend opened a dialog on load:\n" + "\n---\n".join(dialogs)
    assert not load_errors, f"{name}: the frontend reported errors on load: {load_errors}"
    missing = browser.page.evaluate("(types) => types.filter((t) => !(t in window.LiteGraph.registered_node_types))",
                                    [n["type"] for n in workflow["nodes"]])
    assert not missing, f"{name}: node types the frontend does not know: {missing}"
    assert not browser.errors(since)[0], browser.errors(since)[0]
    boxes = browser.node_boxes()
    assert len(boxes) == len(workflow["nodes"])
    browser.screenshot(Path(name).stem)
    assert not overlaps(boxes), f"{name}: nodes overlap:\n" + "\n".join(overlaps(boxes))
    prompt = browser.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    api = json.loads((API_WORKFLOWS / name.replace(".json", "_api.json")).read_text())
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in api.items()}


def test_templates_dialog_lists_the_ui_graphs_with_their_thumbnails(browser, server):
    """ComfyUI's Templates dialog, the pack's entry under Extensions: a card for each UI graph of workflows/ (no
    API twin), each card's thumbnail loaded (HTTP 200, image/jpeg, a decoded picture), and a card opens its graph."""
    expected = sorted(Path(name).stem for name in UI_WORKFLOWS)
    assert sorted(server.get("/workflow_templates")[TEMPLATES_PACK]) == expected  # the server's list, unfiltered
    responses = {}

    def on_response(response):
        if "/workflow_templates/" in response.url:
            responses[response.url] = (response.status, response.headers.get("content-type", ""))

    browser.close_dialogs()
    since = len(browser.console)
    page = browser.page
    page.on("response", on_response)
    try:
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.get_by_role("dialog").get_by_role("button", name=TEMPLATES_PACK, exact=True).click(timeout=30_000)
        page.wait_for_function(
            """([selector, names]) => {
                const cards = [...document.querySelectorAll(selector)];
                const shown = cards.map((c) => c.dataset.testid.slice("template-workflow-".length)).sort();
                return JSON.stringify(shown) === JSON.stringify(names) &&
                    cards.every((c) => [...c.querySelectorAll("img")].some((i) => i.complete && i.naturalWidth > 0));
            }""", arg=[TEMPLATE_CARD, expected], timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(Path(tempfile.gettempdir()) / "streamline_browser_templates.png"))
        cards = page.evaluate("""(selector) => [...document.querySelectorAll(selector)].map((c) => ({
            name: c.dataset.testid.slice("template-workflow-".length), text: c.innerText,
            images: [...c.querySelectorAll("img")].map((i) => [i.naturalWidth, i.naturalHeight])}))""", TEMPLATE_CARD)
        shown = [card["name"] for card in cards]
        assert sorted(shown) == expected, shown
        assert not any(name.endswith("_api") for name in shown), shown
        for card in cards:
            assert card["name"] in card["text"], card
            assert (512, 512) in [tuple(size) for size in card["images"]], card  # workflows/<name>.jpg, square
        pictures = {f"{server.url}/api/workflow_templates/{TEMPLATES_PACK}/{name}.jpg": name for name in expected}
        for url in pictures:
            assert responses.get(url, (None,))[0] == 200, f"{url}: {responses.get(url)} (asked: {sorted(responses)})"
            assert responses[url][1].startswith("image/jpeg"), responses[url]
        assert not [url for url in responses if "_api" in url], responses

        # A card opens its UI graph on the canvas (an API-format file opened an empty one).
        opened = "tinyvideo_streamline"
        page.locator(f'[data-testid="template-workflow-{opened}"]').click()
        nodes = len(json.loads((WORKFLOWS / f"{opened}.json").read_text())["nodes"])
        page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=nodes, timeout=30_000)
        page.wait_for_timeout(1000)
        assert not browser.dialogs(), browser.dialogs()
        assert not browser.load_errors(), browser.load_errors()
        assert responses.get(f"{server.url}/api/workflow_templates/{TEMPLATES_PACK}/{opened}.json", (None,))[0] == 200
    finally:
        page.remove_listener("response", on_response)
        browser.close_dialogs()
    assert not browser.errors(since)[0], browser.errors(since)[0]


def test_missing_models_are_offered_for_download(browser):
    """With the SD1.5 workflow's files absent (renamed here), the frontend reports them (frontend 1.49: the error
    overlay, whose details in the properties panel list each missing model with its Download and Copy URL
    buttons: the workflow names their URLs)."""
    workflow = json.loads((WORKFLOWS / "streamline_animatediff.json").read_text())
    expected = {}
    for node in workflow["nodes"]:
        for model in node["properties"].get("models", []):
            renamed = f"absent-{model['name']}"
            node["widgets_values"] = [renamed if v == model["name"] else v for v in node["widgets_values"]]
            model["name"] = renamed
            expected[renamed] = model["url"]
    workflow["models"] = [m for n in workflow["nodes"] for m in n["properties"].get("models", [])]
    assert len(expected) == 2
    browser.close_dialogs()
    browser.load(workflow, "absent-models.json")
    page = browser.page
    try:
        assert not browser.dialogs(), browser.dialogs()
        overlay = browser.load_errors()
        assert len(overlay) == 1 and "2 errors" in overlay[0], overlay
        page.get_by_test_id("error-overlay-see-errors").click()
        group = page.get_by_test_id("error-group-missing-model")
        group.wait_for(timeout=30_000)
        text = group.inner_text()
        print(f"\nmissing models: {text!r}")
        for name in expected:
            assert name in text, text
            assert group.get_by_role("button", name=f"Download {name}", exact=True).count() == 1, text
        assert group.get_by_test_id("missing-model-download").count() == 2, text  # no "not allowed" instead
        assert group.get_by_role("button", name="Copy URL", exact=True).count() == 2, text
        assert "not allowed" not in text.lower() and "only allowed" not in text.lower(), text
    finally:
        if page.get_by_test_id("properties-panel").is_visible():
            page.get_by_role("button", name="Toggle properties panel", exact=True).click()
        if page.get_by_test_id("error-overlay-dismiss").is_visible():
            page.get_by_test_id("error-overlay-dismiss").click()
        browser.close_dialogs()


def test_budget_rehash_graph_runs_from_the_run_button(browser, server):
    """Run button -> the clip on the Save node, Step Rehash's summary and Memory Budget's run report on their
    nodes, no report clipped, no pack error in the console, still no overlapping nodes."""
    workflow = json.loads((WORKFLOWS / RUN_WORKFLOW).read_text())
    api = json.loads((API_WORKFLOWS / RUN_WORKFLOW.replace(".json", "_api.json")).read_text())
    ids = {v["class_type"]: int(k) for k, v in api.items()}
    budget, sampler, save = ids["StreamlineMemoryBudget"], ids["StreamlineStepRehashSampler"], ids["SaveAnimatedWEBP"]
    browser.close_dialogs()
    since = len(browser.console)
    browser.load(workflow, RUN_WORKFLOW)
    assert not browser.dialogs()
    history_before = set(server.get("/history"))

    started = time.time()
    browser.page.get_by_test_id("queue-button").click()  # the Run button (frontend 1.49)
    browser.page.wait_for_function(
        """([save, sampler, widget]) => {
            const node = window.app.graph.getNodeById(save), rehash = window.app.graph.getNodeById(sampler);
            const report = rehash.widgets?.find((w) => w.name === widget);
            return node.imgs?.length > 0 && report?.value?.includes("steps computed in full");
        }""", arg=[save, sampler, REPORT_WIDGET], timeout=RUN_TIMEOUT_MS)
    ran = time.time() - started
    entries = {k: v for k, v in server.get("/history").items() if k not in history_before}
    assert len(entries) == 1, entries.keys()
    (entry,) = entries.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = entry["outputs"][str(save)]["images"]
    assert (server.base / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
    src = browser.page.evaluate("(id) => window.app.graph.getNodeById(id).imgs[0].src", save)
    assert image["filename"] in src, src

    # The Memory Budget run report comes after sampling, as a "streamline.report" event: give it a moment.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        browser.page.wait_for_function(
            """([id, widget]) => (window.app.graph.getNodeById(id).widgets?.find((w) => w.name === widget)?.value ?? "")
                .split("\\n").some((line) => line.startsWith("Streamline"))""", arg=[budget, REPORT_WIDGET],
            timeout=30_000)
        run_report_shown = True
    except PlaywrightTimeout:  # reported below, with what the node shows
        run_report_shown = False
    reports = browser.reports()
    print(f"\nbrowser run: {ran:.1f} s from the Run button to the clip and the Step Rehash report")
    for node_id, report in reports.items():
        print(f"report on node {node_id}: {report['text']!r}")

    browser.screenshot("run")
    clipped = []
    for node_id in reports:
        browser.focus_node(node_id)
        browser.page.screenshot(path=str(Path(tempfile.gettempdir()) / f"streamline_browser_report_{node_id}.png"))
        report = browser.reports()[node_id]
        if not report["clientHeight"] or report["scrollHeight"] > report["clientHeight"] + 1:
            clipped.append(f"node {node_id}: textarea scrollHeight {report['scrollHeight']} > clientHeight "
                           f"{report['clientHeight']} + 1: {report['text']!r}")

    problems = []
    if sampler not in reports or "steps computed in full" not in reports[sampler]["text"]:
        problems.append(f"no Step Rehash summary on node {sampler}: {reports.get(sampler)}")
    if not run_report_shown:
        problems.append(f"no Memory Budget run report (a line starting 'Streamline') on node {budget} within 30 s "
                        f"of the run: {reports.get(budget)}")
    problems += clipped
    problems += [f"pack error in the browser console: {e}" for e in browser.errors(since)[0]]
    problems += [f"nodes overlap after the run: {o}" for o in overlaps(browser.node_boxes())]
    assert not problems, "\n".join(problems)
