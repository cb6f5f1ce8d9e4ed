"""``attnctl app`` end to end in a real browser (headless Chromium driven by Playwright).

The app runs in a subprocess on 127.0.0.1 (a free port) with the tiny model (``served_app``,
shared with test_app_server.py); the page is driven like a person would: upload, paint a
stroke with the mouse, type, untick a strategy, run, download; once more while three API
clients run theirs. The downloaded outputs must equal, pixel for pixel, what the
Python API makes from the same recipe, seed, image and mask. Requests to anything but
the app are refused, so the page is also shown to work offline. Screenshots are saved
in the test's tmp_path.

Needs Debian's ``chromium`` (no browser is downloaded) and the ``playwright`` and
``gradio`` Python packages (``pip install -e ".[test]"``); skips without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmonpaint_recipe.app.compare import MODES

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("ATTNCTL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TINY = ["model.pretrained=tiny", "sampler.steps=3"]
SEED = 1234
PROMPT = "a small owl"
EXAMPLE_PHOTO = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
RUN_TIMEOUT_MS = 90_000


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"the browser test needs Debian's chromium package at {CHROMIUM}: apt-get install chromium"
    for module in ("playwright", "gradio"):
        if importlib.util.find_spec(module) is None:
            return f"the browser test needs the {module} Python package: pip install -e \".[test]\""
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


@pytest.fixture(scope="module")
def api_pipe(app_api_pipe):
    """The Python API's tiny pipeline (the app's model)."""
    return app_api_pipe


@pytest.fixture(scope="module")
def browser(served_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def app_url(served_app, api_pipe, browser):
    """The app's URL once it answers (``served_app``: one ``attnctl app`` for the app tests)."""
    served_app.wait_until_serving()
    return served_app.url


@pytest.fixture
def page(browser, app_url):
    """A fresh page on the app, ready (its first event has filled the command line)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    outside: list[str] = []

    def only_the_app(route):
        if route.request.url.startswith(app_url):
            route.continue_()
        else:  # the app must work offline: nothing else is reachable
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_app)
    page.goto(app_url)
    page.wait_for_function("() => (document.querySelector('#cli') || {}).textContent?.includes('attnctl inpaint')")
    yield page
    context.close()
    assert outside == [], f"the page requested outside addresses: {outside}"


def _photo(path: Path) -> Path:
    """A copy of the example photo (256x256) to upload."""
    shutil.copyfile(EXAMPLE_PHOTO, path)
    return path


def _upload(page, photo: Path) -> None:
    page.locator("#image-editor input[type=file]").first.set_input_files(str(photo))
    page.locator("#image-editor canvas").last.wait_for()
    page.wait_for_timeout(500)  # the editor scales the image onto its canvas


def _paint_stroke(page) -> None:
    """Drag the brush across the middle of the canvas (the image is centred on it)."""
    box = page.locator("#image-editor canvas").last.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 50, cy - 10)
    page.mouse.down()
    # few pointer events: each one redraws the canvas, slowly without a GPU
    page.mouse.move(cx + 50, cy + 10, steps=4)
    page.mouse.up()


def _download_all(page, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    links = page.locator("#downloads a[download]")
    for i in range(links.count()):
        with page.expect_download() as info:
            links.nth(i).click()
        download = info.value
        target = folder / download.suggested_filename
        download.save_as(target)
        files[target.name.split("_", 1)[1]] = target
    return files


def test_compare_run_in_the_browser_matches_the_python_api(page, api_pipe, tmp_path):
    import harmonpaint_recipe as hp
    from harmonpaint_recipe.loading import resolved

    photo = _photo(tmp_path / "photo.png")
    _upload(page, photo)
    _paint_stroke(page)
    page.fill("#prompt textarea", PROMPT)
    page.locator("#ctl-strategies-makvs-enabled input").uncheck()
    page.fill("#seed input", str(SEED))
    page.locator("#seed input").blur()
    page.wait_for_function("() => document.querySelector('#cli').textContent.includes('strategies.makvs.enabled=false')")
    page.screenshot(path=tmp_path / "1-ready.png", full_page=True)

    page.click("#run")
    page.wait_for_selector("#status .attnctl-done", timeout=RUN_TIMEOUT_MS)
    page.wait_for_selector("#output-a img[src]")
    page.wait_for_selector("#output-b img[src]")
    page.screenshot(path=tmp_path / "2-done.png", full_page=True)
    # the top of the page down to the results: the picture docs/app.md shows
    page.evaluate("window.scrollTo(0, 0)")
    results = page.locator("#output-b").bounding_box()
    page.screenshot(path=tmp_path / "3-page-top.png", full_page=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": results["y"] + results["height"] + 12})
    status = page.inner_text("#status")
    assert f"seed {SEED}: A stock, B harmonpaint (edited on the page: strategies.makvs.enabled=false)" in status

    files = _download_all(page, tmp_path / "downloads")
    assert set(files) == {"A-stock.png", "A-stock.json", "B-harmonpaint.png", "B-harmonpaint.json", "mask.png", "input.png"}
    # the page got the uploaded image unchanged, and the stroke became a mask inside it
    assert np.array_equal(np.asarray(Image.open(files["input.png"])), np.asarray(Image.open(photo)))
    mask = np.asarray(Image.open(files["mask.png"])) > 127
    assert 0.02 < mask.mean() < 0.6 and mask[118:138, 118:138].any() and not mask[:, :16].any()

    all_off = [f"strategies.{name}.enabled=false" for name in ("sams", "steer", "makvs", "phases")]
    outputs = {}
    for name, overrides in (("A-stock", TINY + all_off), ("B-harmonpaint", TINY + ["strategies.makvs.enabled=false"])):
        recipe = hp.load_recipe("harmonpaint", overrides)
        sidecar = json.loads(files[f"{name}.json"].read_text())
        assert (sidecar["seed"], sidecar["prompt"], sidecar["recipe"]) == (SEED, PROMPT, resolved(recipe))
        expected = hp.inpaint(files["input.png"], files["mask.png"], PROMPT, recipe=recipe, pipe=api_pipe, seed=SEED)
        outputs[name] = np.asarray(Image.open(files[f"{name}.png"]))
        assert np.array_equal(outputs[name], np.asarray(expected)), f"{name} differs from the Python API"
    assert not np.array_equal(outputs["A-stock"], outputs["B-harmonpaint"])  # the strategies did act


def test_run_without_a_mask_shows_an_error_in_the_page(page, tmp_path):
    _upload(page, _photo(tmp_path / "photo.png"))
    page.fill("#prompt textarea", PROMPT)
    page.click("#run")
    error = page.wait_for_selector("#status .attnctl-error", timeout=RUN_TIMEOUT_MS)
    page.screenshot(path=tmp_path / "no-mask.png", full_page=True)
    assert error.is_visible()
    assert "no mask: paint over the region to inpaint with the brush" in error.inner_text()
    assert "Traceback" not in page.content()
    assert page.locator("#output-b img[src]").count() == 0


def test_controls_follow_the_recipe_and_bad_values_show_an_error(page, tmp_path):
    page.click("#recipe input")
    page.locator("ul[role=listbox] li", has_text="harmonpaint-natural").click()
    # the recipe's own value is loaded into the generated control, and into the command line
    page.wait_for_function("() => document.querySelector('#ctl-strategies-makvs-scale input').value == '0.8'")
    assert "--recipe harmonpaint-natural" in page.locator("#cli").text_content()
    tau = page.locator("#ctl-strategies-sams-tau input")
    tau.fill("1.5")
    tau.blur()
    error = page.wait_for_selector("#status .attnctl-error")
    assert "strategies.sams: tau must be in [0, 1]" in error.inner_text()
    page.screenshot(path=tmp_path / "out-of-range.png")
    tau.fill("0.2")
    tau.blur()
    page.wait_for_function("() => document.querySelector('#cli').textContent.includes('strategies.sams.tau=0.2')")
    assert page.locator("#status .attnctl-error").count() == 0
    page.get_by_label(MODES["one_off"]).check()
    page.wait_for_selector("#off-instance", state="visible")
    assert page.locator("#off-instance input").input_value() == "sams"
    page.click("#recipe input")
    page.locator("ul[role=listbox] li", has_text="sdi").click()
    page.wait_for_function("() => !document.querySelector('#ctl-strategies-sams-enabled input').checked")
    assert page.locator("#ctl-strategies-sams-tau input").input_value() == "0.1"  # sdi's own value again


def test_a_browser_run_among_api_clients_gets_its_own_images(page, app_url, api_pipe, tmp_path):
    """Three API clients and the browser at once: each gets the images the Python API makes for its inputs."""
    import harmonpaint_recipe as hp
    from app_server import ALL_OFF, RunApi, editor_value, make_case, png_bytes, sha256

    api = RunApi(app_url)
    cases = [make_case(tmp_path / "api-clients", 20 + i) for i in range(3)]
    jobs = [api.client().submit(*api.args(image_editor=editor_value(c.image, c.layer), prompt=c.prompt, seed=c.seed),
                                api_name="/run") for c in cases]
    photo = _photo(tmp_path / "photo.png")
    _upload(page, photo)
    _paint_stroke(page)
    page.fill("#prompt textarea", "a browser's own owl")
    page.fill("#seed input", "4321")
    page.locator("#seed input").blur()
    page.wait_for_function("() => document.querySelector('#cli').textContent.includes('--seed 4321')")
    page.click("#run")
    page.wait_for_selector("#status .attnctl-done", timeout=4 * RUN_TIMEOUT_MS)
    assert "seed 4321: A stock, B harmonpaint" in page.inner_text("#status")
    files = _download_all(page, tmp_path / "browser-downloads")
    results = [job.result(timeout=RUN_TIMEOUT_MS / 1000) for job in jobs]

    made = []
    for name, overrides in (("A-stock", TINY + ALL_OFF), ("B-harmonpaint", TINY)):
        expected = hp.inpaint(files["input.png"], files["mask.png"], "a browser's own owl",
                              recipe=hp.load_recipe("harmonpaint", overrides), pipe=api_pipe, seed=4321)
        assert files[f"{name}.png"].read_bytes() == png_bytes(expected), f"the browser's {name} is not its own"
        made.append(sha256(png_bytes(expected)))
    for case, result in zip(cases, results):
        got = next(Path(p) for p in result[3] if p.endswith("_B-harmonpaint.png")).read_bytes()
        expected = hp.inpaint(case.image, case.mask, case.prompt, recipe=hp.load_recipe("harmonpaint", TINY),
                              pipe=api_pipe, seed=case.seed)
        assert sha256(got) == sha256(png_bytes(expected)), f"{case.name} did not get its own image"
        made.append(sha256(got))
    assert len(set(made)) == len(made)  # every client's images differ: a mix-up would show
