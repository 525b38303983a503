"""Screenshots of the web admin UI for the docs: ``python -m bench.ui_screenshots``.

Builds a small live network on loopback (a real server with its admin listener, three
real agents, a user, tagged keys, a policy, one open relayed stream), logs in with
``homeport admin-link`` in headless Chromium and saves one PNG per page to
``docs/images/webui-*.png``. Not run by CI: the images are committed.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
from pathlib import Path
from tempfile import TemporaryDirectory

from homeport.testing.browser import chromium, chromium_missing, save_screenshot
from homeport.testing.deadline import wait_for
from tests.harness import HOMEPORT, Homeport, free_port, serve_in_threads, tcp_accepts

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
POLICY = """// who may reach what (docs/policy.md)
{
  "groups": {"group:ops": ["alice@example.com"]},
  "tagOwners": {"tag:lab": ["group:ops"], "tag:ci": ["group:ops"]},
  "acls": [
    {"action": "accept", "src": ["group:ops"], "dst": ["*:*"]},
    {"action": "accept", "src": ["tag:ci"], "dst": ["tag:lab:22"]},
  ],
  "tests": [
    {"src": "tag:ci", "accept": ["tag:lab:22"], "deny": ["tag:lab:5432"]},
  ],
}
"""
BROKEN = POLICY.replace('"deny": ["tag:lab:5432"]', '"deny": ["tag:lab:22"]')


def _echo() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    serve_in_threads(sock, handle)
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="where the PNGs go")
    args = ap.parse_args(argv)
    missing = chromium_missing()
    if missing:
        print(f"cannot take screenshots: {missing}")
        return 1
    with TemporaryDirectory(prefix="hp-shots-") as tmp:
        hp = Homeport(Path(tmp))
        echo = _echo()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        nc: subprocess.Popen[bytes] | None = None
        try:
            hp.start_server(extra=["--admin-listen", f"127.0.0.1:{port}"])
            wait_for(lambda: tcp_accepts("127.0.0.1", port), 20, "admin listener")
            data = ["--data", str(hp.data_dir)]
            hp.run([*HOMEPORT, "users", "create", *data, "alice@example.com"])
            policy_file = Path(tmp) / "policy.hujson"
            policy_file.write_text(POLICY, encoding="utf-8")
            hp.run([*HOMEPORT, "policy", "set", *data, str(policy_file)])
            echo_port = echo.getsockname()[1]
            lab = hp.up(
                "labpc",
                "--expose",
                f"ssh=127.0.0.1:{echo_port}",
                "--expose",
                f"echo=127.0.0.1:{echo_port}",
                key=hp.keys_create("--tag", "tag:lab", "--note", "lab machines"),
            )
            ci = hp.up("ci-runner", key=hp.keys_create("--tag", "tag:ci", "--note", "ci"))
            laptop = hp.up("laptop", key=hp.keys_create("--user", "alice@example.com"))
            for name, proc in (("labpc", lab), ("ci-runner", ci), ("laptop", laptop)):
                hp.wait_online(name, proc)
            hp.keys_create("--reusable", "--expiry", "7d", "--note", "new lab boxes")
            nc = subprocess.Popen(
                [*HOMEPORT, "nc", "--state", str(hp.state("laptop")), "labpc", "echo"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=hp.env,
            )
            assert nc.stdin is not None and nc.stdout is not None
            nc.stdin.write(b"hello\n")
            nc.stdin.flush()
            assert nc.stdout.readline() == b"hello\n"
            with chromium(1400, 800) as driver:
                from selenium.webdriver.common.by import By
                from selenium.webdriver.support import expected_conditions as ec
                from selenium.webdriver.support.ui import WebDriverWait

                link = hp.run([*HOMEPORT, "admin-link", *data]).stdout.strip()
                driver.get(f"{base}/ui/login")
                save_screenshot(driver, args.out / "webui-login.png")
                driver.get(link)
                WebDriverWait(driver, 30).until(ec.url_to_be(base + "/ui/nodes"))
                for page in ("nodes", "users", "streams", "audit"):
                    driver.get(f"{base}/ui/{page}")
                    save_screenshot(driver, args.out / f"webui-{page}.png")
                driver.get(f"{base}/ui/keys")
                form = driver.find_element(By.ID, "create-key")
                form.find_element(By.NAME, "note").send_keys("from the web UI")
                form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
                WebDriverWait(driver, 30).until(
                    ec.presence_of_element_located((By.ID, "new-key-value"))
                )
                save_screenshot(driver, args.out / "webui-keys.png")
                driver.get(f"{base}/ui/policy")
                text = driver.find_element(By.ID, "policy-text")
                text.clear()
                text.send_keys(BROKEN)
                driver.find_element(By.CSS_SELECTOR, "#policy-form button").click()
                WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.ID, "error")))
                form = driver.find_element(By.ID, "explain-form")
                form.find_element(By.NAME, "src").send_keys("ci-runner")
                form.find_element(By.NAME, "dst").send_keys("labpc")
                form.find_element(By.NAME, "service").send_keys("echo")
                save_screenshot(driver, args.out / "webui-policy.png")
        finally:
            if nc is not None:
                nc.kill()
                nc.wait()
            hp.close()
            echo.close()
    for png in sorted(args.out.glob("webui-*.png")):
        print(f"wrote {png} ({png.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
