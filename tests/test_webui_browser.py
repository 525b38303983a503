"""The web admin UI in a real headless Chromium against a real server and a real agent.

The journey an operator takes: ``homeport admin-link`` on the server host, open the link
(the page trades the one-time secret for a session cookie and wipes it from the address
bar), create an auth key in the UI, enroll a real agent with it, watch it come online,
try a policy whose own test fails and see it refused with its reason, then remove the
node from the UI and see its agent cut off.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from homeport.server.admin import admin_request
from homeport.testing.browser import chromium, chromium_missing
from homeport.testing.deadline import wait_for
from tests.harness import HOMEPORT, Homeport, free_port, tcp_accepts

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.integration

_missing = chromium_missing()
if _missing is not None:
    pytest.skip(f"needs headless Chromium: {_missing}", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: Seconds the UI gets to show what the server already did (a page load on a busy VM).
UI_DEADLINE = 30.0
FAILING_POLICY = """{
  "tagOwners": {"tag:lab": ["alice@example.com"]},
  "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:lab:22"]}],
  // this test contradicts the rule above: the policy must be refused
  "tests": [{"src": "alice@example.com", "deny": ["tag:lab:22"]}],
}"""


@dataclass
class Site:
    hp: Homeport
    base: str
    driver: WebDriver

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def node_row_text(self, name: str) -> str | None:
        self.open("/ui/nodes")
        rows = self.driver.find_elements(By.CSS_SELECTOR, f'tr[data-node="{name}"]')
        return str(rows[0].text) if rows else None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("webui")
    hp = Homeport(root)
    admin_port = free_port()
    try:
        hp.start_server(extra=["--admin-listen", f"127.0.0.1:{admin_port}"])
        wait_for(lambda: tcp_accepts("127.0.0.1", admin_port), 20, "the admin listener")
        try:
            browser = chromium()
            driver = browser.__enter__()
        except RuntimeError as exc:
            pytest.skip(f"headless Chromium cannot start here: {exc}")
        try:
            yield Site(hp, f"http://127.0.0.1:{admin_port}", driver)
        finally:
            browser.__exit__(None, None, None)
    finally:
        hp.close()


def test_operator_journey_in_chromium(site: Site) -> None:
    hp, driver = site.hp, site.driver
    # 1. log in with a one-time link printed on the server host
    out = hp.run([*HOMEPORT, "admin-link", "--data", str(hp.data_dir)])
    url = out.stdout.strip()
    assert re.fullmatch(rf"{re.escape(site.base)}/ui/login#link=[A-Za-z0-9_-]{{40,}}", url), url
    secret = url.split("#link=", 1)[1]
    driver.get(url)
    WebDriverWait(driver, UI_DEADLINE).until(ec.url_to_be(site.base + "/ui/nodes"))
    assert secret not in driver.current_url  # no secret left in the address bar
    assert "admin-link · admin" in site.text("header")
    cookie = driver.get_cookie("hp_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # the link was used up: a second browser visit is refused
    driver.delete_all_cookies()
    driver.get(url)
    WebDriverWait(driver, UI_DEADLINE).until(
        ec.text_to_be_present_in_element((By.ID, "error"), "already used")
    )
    driver.get(hp.run([*HOMEPORT, "admin-link", "--data", str(hp.data_dir)]).stdout.strip())
    WebDriverWait(driver, UI_DEADLINE).until(ec.url_to_be(site.base + "/ui/nodes"))

    # 2. create an auth key in the UI (shown once) and enroll a real agent with it
    site.open("/ui/keys")
    form = driver.find_element(By.ID, "create-key")
    expiry = form.find_element(By.NAME, "expiry")
    expiry.clear()
    expiry.send_keys("1h")
    form.find_element(By.NAME, "note").send_keys("browser e2e")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    key = (
        WebDriverWait(driver, UI_DEADLINE)
        .until(ec.presence_of_element_located((By.ID, "new-key-value")))
        .text.strip()
    )
    keys = admin_request(hp.data_dir, {"op": "keys.list"})["keys"]
    assert [k["note"] for k in keys] == ["browser e2e"] and keys[0]["key_id"] in key
    site.open("/ui/keys")
    assert key not in driver.page_source  # shown once only

    agent = hp.up("webnode", key=key)

    def online() -> bool:
        if agent.poll() is not None:
            raise AssertionError(f"agent exited:\n{hp.log('agent-webnode')}")
        row = site.node_row_text("webnode")
        return row is not None and "online" in row.split()

    wait_for(online, UI_DEADLINE, "webnode online on the nodes page", interval=0.2)

    # 3. a policy whose own test fails is refused, with the test and its reason
    site.open("/ui/policy")
    text = driver.find_element(By.ID, "policy-text")
    text.clear()
    text.send_keys(FAILING_POLICY)
    driver.find_element(By.CSS_SELECTOR, "#policy-form button[type=submit]").click()
    error = WebDriverWait(driver, UI_DEADLINE).until(
        ec.presence_of_element_located((By.ID, "error"))
    )
    assert "policy refused; the policy in force is unchanged" in error.text
    problems = site.text("#problems")
    assert "tests[0]" in problems and "alice@example.com" in problems, problems
    assert admin_request(hp.data_dir, {"op": "policy.get"})["set"] is False
    # the typed text stays in the editor for fixing
    assert "tag:lab:22" in str(driver.find_element(By.ID, "policy-text").get_attribute("value"))

    # the explain dry run
    form = driver.find_element(By.ID, "explain-form")
    form.find_element(By.NAME, "src").send_keys("alice@example.com")
    form.find_element(By.NAME, "dst").send_keys("webnode")
    form.find_element(By.NAME, "service").send_keys("22")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    verdict = WebDriverWait(driver, UI_DEADLINE).until(
        ec.presence_of_element_located((By.ID, "explain"))
    )
    cli = admin_request(
        hp.data_dir,
        {"op": "policy.explain", "src": "alice@example.com", "dst": "webnode", "service": "22"},
    )
    assert cli["ok"] and cli["verdict"] in verdict.text and cli["reason"] in verdict.text

    # 4. remove the node from the UI: its agent is cut off
    site.open("/ui/nodes")
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-node="webnode"]')
    row.find_element(By.CSS_SELECTOR, 'button[data-action="remove"]').click()
    WebDriverWait(driver, UI_DEADLINE).until(ec.alert_is_present()).accept()
    WebDriverWait(driver, UI_DEADLINE).until(
        ec.text_to_be_present_in_element((By.ID, "flash"), "remove: webnode done")
    )
    assert agent.wait(timeout=UI_DEADLINE) != 0  # the session was cut
    assert "removed" in hp.log("agent-webnode").lower()
    assert site.node_row_text("webnode") is None

    # 5. the audit log shows what the UI did
    site.open("/ui/audit?q=webnode")
    audit = site.text("#audit")
    assert "node-remove" in audit or "remove" in audit, audit
    events = [json.loads(x) for x in (hp.data_dir / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "policy-refused" for e in events)


def test_logout_and_a_forged_form_in_chromium(site: Site) -> None:
    """Logging out ends the session; a POST without the CSRF token is refused in the browser."""
    driver, hp = site.driver, site.hp
    driver.get(hp.run([*HOMEPORT, "admin-link", "--data", str(hp.data_dir)]).stdout.strip())
    WebDriverWait(driver, UI_DEADLINE).until(ec.url_to_be(site.base + "/ui/nodes"))
    site.open("/ui/keys")
    # strip the CSRF token from the real form, as a forged form would lack it
    driver.execute_script("document.querySelector('#create-key input[name=csrf]').value = ''")
    driver.find_element(By.CSS_SELECTOR, "#create-key button[type=submit]").click()
    WebDriverWait(driver, UI_DEADLINE).until(
        ec.text_to_be_present_in_element((By.ID, "error"), "CSRF")
    )
    driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
    WebDriverWait(driver, UI_DEADLINE).until(ec.url_to_be(site.base + "/ui/login"))
    site.open("/ui/nodes")
    assert driver.current_url == site.base + "/ui/login"
