"""Swagger UI's "Authorize" at /docs, in headless Chromium, against a live server with public docs:
the bearer key entered there is sent with "Try it out" (200 with the same answer as our own
call), and a wrong key gets the 401.

FastAPI's /docs page loads Swagger UI from a CDN, which this test cannot reach: Chromium resolves
the CDN's host to a local HTTPS server (self-signed, certificate errors ignored) that serves the
same Swagger UI 5 files from the ``swagger-ui-py`` package (the test extra). Skipped only when
Chromium, its driver, selenium, that package or openssl is missing.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import KEYS, ROOT, ServerProcess
from tests.e2e.test_playground import CHROMIUM, DRIVER, webdriver

CDN_HOST = "cdn.jsdelivr.net"  # where FastAPI's get_swagger_ui_html points
CDN_PREFIX = "/npm/swagger-ui-dist@5/"
TEXT = "a photo of a red square"

if webdriver is not None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    """CLIP of the demo (tiny, random) with ``public_docs`` on and the key ``KEYS[0]``."""
    clip = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["clip"]
    for m in clip["models"]:
        m["arch_config"] = str(ROOT / "configs" / m["arch_config"])
    proc = ServerProcess(
        {"public_docs": True, "clip": clip}, tmp_path_factory.mktemp("docs"), ["--api-key", KEYS[0]]
    )
    try:
        yield proc.wait_ready(180)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def swagger_cdn(tmp_path_factory):
    """An HTTPS server standing in for the CDN: yields its port."""
    swagger_ui = pytest.importorskip("swagger_ui", reason="pip install swagger-ui-py (the test extra)")
    if not shutil.which("openssl"):
        pytest.skip("no openssl to make the stand-in CDN's certificate")
    tmp = tmp_path_factory.mktemp("cdn")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={CDN_HOST}"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    static = Path(swagger_ui.__file__).parent / "static"

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path: str) -> str:
            name = path.split("?", 1)[0].removeprefix(CDN_PREFIX)
            return str(static / Path(name).name)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(static))
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def docs_browser(swagger_cdn):
    if webdriver is None:
        pytest.skip("pip install selenium (the test extra)")
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium/chromedriver on PATH: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1200,1600",
        f"--host-resolver-rules=MAP {CDN_HOST} 127.0.0.1:{swagger_cdn}",
        "--ignore-certificate-errors",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def find(driver, css: str, timeout: float = 60.0):
    """The first element matching ``css`` once it is displayed."""

    def shown(d):
        hits = [e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return hits[0] if hits else False

    return WebDriverWait(driver, timeout).until(shown)


def authorize(driver, key: str) -> None:
    """Open the Authorize dialog, log out of a previous key, enter ``key``, close the dialog."""
    find(driver, ".auth-wrapper button.authorize").click()
    for button in driver.find_elements(By.CSS_SELECTOR, ".modal-ux button"):
        if button.text.strip() == "Logout":
            button.click()
    field = find(driver, ".modal-ux input")
    field.clear()
    field.send_keys(key)
    find(driver, ".modal-ux .auth-btn-wrapper button.authorize").click()
    find(driver, ".modal-ux .btn-done").click()


def try_it_out(driver, body: dict) -> tuple[str, str, str]:
    """Execute POST /clip/encode_text with ``body`` from its opened operation: the status shown,
    the response body shown and the curl command shown."""
    body_field = find(driver, "textarea.body-param__text")
    body_field.clear()
    body_field.send_keys(json.dumps(body))
    for old in driver.find_elements(By.CSS_SELECTOR, ".btn-clear"):
        old.click()
    find(driver, "button.execute").click()
    status = find(driver, ".live-responses-table .response .response-col_status", 120).text.split()[0]
    shown = driver.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre").text
    curl = driver.find_element(By.CSS_SELECTOR, ".curl-command").text
    return status, shown, curl


def test_authorize_sends_the_bearer_key_and_a_wrong_key_gets_401(docs_server, docs_browser):
    driver = docs_browser
    driver.get(docs_server.url + "/docs")  # public_docs: no key needed to read the page
    find(driver, ".opblock-summary-path[data-path='/clip/encode_text']").click()
    find(driver, "button.try-out__btn").click()

    authorize(driver, KEYS[0])
    status, shown, curl = try_it_out(driver, {"text": TEXT})
    assert status == "200", shown
    assert f"Authorization: Bearer {KEYS[0]}" in curl
    ours = requests.post(
        docs_server.url + "/clip/encode_text",
        json={"text": TEXT},
        headers={"Authorization": f"Bearer {KEYS[0]}"},
        timeout=60,
    )
    assert ours.status_code == 200
    assert json.loads(shown) == ours.json()  # the same model on the same text: the same answer

    authorize(driver, "not-a-key")
    status, shown, curl = try_it_out(driver, {"text": TEXT})
    assert status == "401", shown
    assert "Authorization: Bearer not-a-key" in curl
    assert json.loads(shown)["error"]["code"]
