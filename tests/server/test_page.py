"""The web page at GET / (src/server/page/index.html) in a real browser:
Debian's chromium, headless, driven by selenium through chromium-driver
(scripts/install-deps.sh installs both; without them these tests skip).

The page is used as a person would: a file chosen, fields typed, Upscale
pressed; the test reads what the page shows (progress, errors, the image it
offers for download) and checks it against the API answering the same
request directly.
"""
import base64
import os
import shutil
import time

import pytest

from conftest import Server, image_bytes, problem

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

GAN_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "gan", "rrdb_x4")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    """One headless chromium for the module; its driver is the Debian one,
    named here, so selenium never looks for (or downloads) another. What the
    page offers for download lands in `downloads`."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("the page's browser tests need chromium and chromedriver (Debian: chromium "
                    "chromium-driver, scripts/install-deps.sh)")
    if webdriver is None:
        pytest.skip("selenium is not installed (tests/server/requirements.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    # no cache: the direct request below computes its image again rather
    # than being handed the page's
    s = Server("--request-timeout", "60", "--cache-size", "0")
    yield s
    s.check_clean_exit()


def open_page(browser, server):
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "go").is_enabled() or shown(d, "error"))


def wait(browser, condition, timeout=20):
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def shown(browser, element_id):
    return browser.find_element(By.ID, element_id).is_displayed()


def set_field(browser, name, value):
    el = browser.find_element(By.NAME, name)
    el.clear()
    el.send_keys(value)


def state(browser):
    return browser.find_element(By.ID, "out").get_attribute("data-state")


def test_page_is_self_contained(server):
    r = server.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "src", "server", "page", "index.html"), "rb") as f:
        assert r.content == f.read()  # the binary serves the repository's file


def test_upscale_shows_progress_and_offers_the_apis_image(browser, server, downloads, tmp_path):
    src = tmp_path / "card.png"
    src.write_bytes(image_bytes(size=(64, 64)))
    open_page(browser, server)
    assert not shown(browser, "key-box")  # no keys on this server
    fields = {"prompt": "a test card", "num_inference_steps": "2", "seed": "42"}
    for name, value in fields.items():
        set_field(browser, name, value)
    browser.find_element(By.ID, "file").send_keys(str(src))
    wait(browser, lambda d: "64×64" in d.find_element(By.ID, "file-info").text)
    # every status line the page writes, as it writes it
    browser.execute_script("""
        window.statuses = [];
        const s = document.getElementById('status');
        new MutationObserver(() => window.statuses.push(s.textContent))
            .observe(s, {childList: true, characterData: true, subtree: true});""")
    started = time.time()
    browser.find_element(By.ID, "go").click()
    wait(browser, lambda d: state(d) in ("done", "error"), timeout=60)
    assert state(browser) == "done", browser.find_element(By.ID, "error").text
    statuses = browser.execute_script("return window.statuses")
    steps = [s for s in statuses if s.startswith("Step ")]  # "Step i of 2[, about 1 s left]"
    numbers = [int(s.split()[1]) for s in steps]
    assert steps and all(s.split(",")[0].endswith(" of 2") for s in steps), statuses
    assert numbers == sorted(numbers), statuses
    for text, n in zip(steps, numbers):
        if numbers[0] < n < 2:  # a step after the first one seen: the time left, from the time they took
            assert "left" in text, statuses
        if n == 2:
            assert text.endswith(", finishing"), statuses
    assert statuses[-1].startswith("Done in "), statuses
    progress = browser.find_element(By.ID, "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "2"

    # the image offered for download (the link clicked, the file saved) is
    # the API's answer to the same request
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download") == "card-upscaled.png"
    link.click()
    saved = downloads / "card-upscaled.png"
    wait(browser, lambda d: saved.exists() and not list(downloads.glob("*.crdownload")))
    offered = saved.read_bytes()
    direct = server.post("/api/v1/upscale", files={"image": ("card.png", src.read_bytes(), "image/png")},
                         data=fields)
    assert direct.status_code == 200 and direct.headers["X-Seed"] == "42"
    assert offered == direct.content
    assert "256×256" in browser.find_element(By.ID, "result-info").text
    assert "seed 42" in browser.find_element(By.ID, "result-info").text

    # before/after: the input drawn over the result at its size; the slider moves by arrow keys
    before, after = browser.find_element(By.ID, "before"), browser.find_element(By.ID, "after")
    assert before.size == after.size and after.size["width"] > 0
    slider = browser.find_element(By.ID, "slider")
    slider.send_keys(Keys.ARROW_LEFT * 5)
    assert slider.get_attribute("value") == "45"
    assert "55%" in before.value_of_css_property("clip-path")
    # the script ran under the page's Content-Security-Policy without a complaint
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert time.time() - started < 30


def test_a_bad_file_shows_the_servers_problem(browser, server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are notes, not an image\n")
    open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "go").click()
    wait(browser, lambda d: state(d) == "error")
    p = problem(server.post("/api/v1/jobs", files={"image": ("notes.png", bad.read_bytes(), "image/png")}),
                415, "unsupported-image-format")
    assert browser.find_element(By.ID, "error-title").text == p["title"]
    assert browser.find_element(By.ID, "error-detail").text == p["detail"]
    assert not shown(browser, "progress-box")
    assert browser.find_element(By.ID, "go").is_enabled()  # free to try another file


def test_api_key_is_asked_for_and_remembered(browser):
    s = Server("--api-keys", "page-key")
    try:
        open_page(browser, s)
        assert shown(browser, "key-box") and shown(browser, "error")  # model-info answered 401
        p = problem(s.get("/api/v1/model-info"), 401, "unauthorized")
        assert browser.find_element(By.ID, "error-title").text == p["title"]
        assert browser.find_element(By.ID, "error-detail").text == p["detail"]
        key = browser.find_element(By.ID, "key")
        assert browser.switch_to.active_element == key  # focus is where the key goes
        key.send_keys("page-key", Keys.TAB)  # change: kept, and the page loads again with it
        wait(browser, lambda d: d.find_element(By.ID, "go").is_enabled())
        assert not shown(browser, "error")
        assert browser.execute_script("return localStorage.getItem('sdx4-api-key')") == "page-key"
        browser.refresh()  # remembered: the field is there, filled, and the page works at once
        wait(browser, lambda d: d.find_element(By.ID, "go").is_enabled())
        assert shown(browser, "key-box") and browser.find_element(By.ID, "key").get_attribute("value") == "page-key"
        browser.execute_script("localStorage.clear()")
    finally:
        s.check_clean_exit()


def test_a_gan_model_hides_the_diffusion_fields(browser):
    s = Server(model=GAN_MODEL)
    try:
        open_page(browser, s)
        assert browser.find_element(By.ID, "go").is_enabled()
        for name in ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "noise_level",
                     "scheduler"):
            assert not browser.find_element(By.NAME, name).is_displayed(), name
        assert browser.find_element(By.NAME, "tile").is_displayed()
        assert "gan" in browser.find_element(By.ID, "model-note").text
        # an image pasted, then one dropped, becomes the chosen file
        for event, name in (("paste", "pasted.png"), ("drop", "dropped.png")):
            browser.execute_script("""
                const [event, name, b64] = arguments;
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], name, {type: 'image/png'}));
                document.getElementById('drop').dispatchEvent(event === 'paste'
                    ? new ClipboardEvent('paste', {clipboardData: dt, bubbles: true})
                    : new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""",
                event, name, base64.b64encode(image_bytes(size=(80, 64))).decode())
            wait(browser, lambda d: d.find_element(By.ID, "file-info").text.startswith(name)
                 and "80×64" in d.find_element(By.ID, "file-info").text)
            assert browser.execute_script("return document.getElementById('file').files[0].name") == name
    finally:
        s.check_clean_exit()
