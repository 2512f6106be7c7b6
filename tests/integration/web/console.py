"""The web console in a real browser: headless Chromium from Debian's
packages, driven by Selenium through Debian's chromedriver. Run by
tests/integration/web.rs against a `revive serve` it started; never on its
own. Every step waits for what a person would see on the page, with a bound.

Arguments (JSON, argv[1]): url, token, vm (backed up, recovered and
migrated), xss_vm (a VM named with markup), dest (copy migration folder),
shots (screenshot folder).
"""

import base64
import json
import os
import shutil
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DESKTOP = (1280, 900)
PHONE = (390, 844)
# Longest wait for one thing to show (the server is on loopback; CI has 2 busy cores).
STEP = 60
# Longest wait for the copy migration (48 MiB at 8 MiB/s, then switchover).
MIGRATION = 120

args = json.loads(sys.argv[1])
os.makedirs(args["shots"], exist_ok=True)


def log(msg):
    print(f"[console.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def browser(profile):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={profile}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ]:
        opts.add_argument(a)
    # Leave dialogs open so the test can see whether one opened.
    opts.set_capability("unhandledPromptBehavior", "ignore")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


profile = tempfile.mkdtemp(prefix="revive-chromium-")
d = browser(profile)
# The page honours reduced motion: the progress bar jumps to its value, so
# a screenshot shows the value the page read.
d.execute_cdp_cmd("Emulation.setEmulatedMedia",
                  {"features": [{"name": "prefers-reduced-motion", "value": "reduce"}]})
console_log = []


def wait(what, cond, limit=STEP):
    try:
        # A refresh may replace an element between finding and reading it.
        return WebDriverWait(d, limit, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: cond())
    except TimeoutException:
        raise AssertionError(f"timed out after {limit} s waiting for {what}\npage text:\n{page_text()}")


def page_text():
    try:
        return d.find_element(By.TAG_NAME, "body").text
    except Exception as e:  # the page itself may be the problem
        return f"(no page text: {e})"


def js(script, *a):
    return d.execute_script(script, *a)


def no_dialog():
    """No alert, confirm or prompt opened (the console uses none)."""
    try:
        alert = d.switch_to.alert
        raise AssertionError(f"a JavaScript dialog opened: {alert.text!r}")
    except NoAlertPresentException:
        pass


def token_not_in_url():
    assert args["token"] not in d.current_url, d.current_url


def shot(name, phone=False):
    """A full-page PNG (desktop, or a phone-sized viewport)."""
    if phone:
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 1, "mobile": True})
        time.sleep(0.4)  # layout, and the charts redraw on resize
    png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = os.path.join(args["shots"], f"{name}{'-phone' if phone else ''}.png")
    with open(path, "wb") as f:
        f.write(base64.b64decode(png["data"]))
    if phone:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        time.sleep(0.2)
    log(f"screenshot {path}")


def both(name):
    shot(name)
    shot(name, phone=True)


def visible(selector):
    els = d.find_elements(By.CSS_SELECTOR, selector)
    return els[0] if els and els[0].is_displayed() else None


def login(tok):
    field = wait("the login form", lambda: visible("#login #token"))
    field.clear()
    field.send_keys(tok)
    d.find_element(By.CSS_SELECTOR, "#login-submit").click()


def card(selector):
    els = d.find_elements(By.CSS_SELECTOR, selector)
    return els[0] if els else None


def card_state(c):
    return c.get_attribute("data-state") if c else None


def click_action(c, action):
    button = c.find_element(By.CSS_SELECTOR, f"button[data-action='{action}']")
    assert button.is_displayed(), f"{action} button hidden in state {card_state(c)}"
    button.click()
    return wait("the confirmation dialog", lambda: visible("dialog.confirm[open]"))


def step_login():
    d.get(args["url"])
    wait("the login page", lambda: visible("#login"))
    assert js("return sessionStorage.length") == 0
    shot("login")
    login("not-the-token")
    err = wait("the wrong-token error", lambda: visible("#login-error"))
    assert "Wrong token" in err.text, err.text
    assert visible("#login"), "a wrong token must leave the login page on screen"
    assert js("return sessionStorage.length") == 0, "a refused token must not be kept"
    assert d.find_element(By.ID, "top").is_displayed() is False
    shot("login-wrong-token")
    log("wrong token: login page again with an error")
    login(args["token"])
    wait("the repository page", lambda: visible("#page-overview .vm"))
    assert js("return sessionStorage.getItem('revive-token')") == args["token"]
    token_not_in_url()
    log("logged in")


def step_overview():
    names = wait("both VMs", lambda: (lambda n: n if len(n) >= 2 else None)(
        [e.text for e in d.find_elements(By.CSS_SELECTOR, "#page-overview .vm-name")]))
    assert args["vm"] in names, names
    # The markup in the VM's name is text on the page, not an element.
    assert args["xss_vm"] in names, names
    assert js("return document.querySelectorAll('script').length") == 1
    assert js("return document.querySelectorAll('#app script, #app img').length") == 0
    no_dialog()
    rows = d.find_elements(By.CSS_SELECTOR, f".vm[data-vm='{args['vm']}'] tbody tr")
    assert len(rows) == 2, f"{args['vm']} has two restore points: {len(rows)} rows"
    both("overview")
    log(f"overview: {names}, the markup VM shows as text, no dialog")


def step_recover(vm, name=None):
    d.get(args["url"] + "#/overview")
    c = wait(f"the card of {vm}", lambda: next(
        (e for e in d.find_elements(By.CSS_SELECTOR, "#page-overview .vm")
         if e.find_element(By.CSS_SELECTOR, ".vm-name").text == vm), None))
    c.find_element(By.CSS_SELECTOR, "button[data-action='recover-latest']").click()
    wait("the recover form with the VM chosen",
         lambda: visible("#recover-form") and js("return document.getElementById('recover-vm').value") == vm
         and js("return document.getElementById('recover-host').options.length") > 0)
    assert js("return document.getElementById('recover-power-on').disabled"), "publish-only host: no power on"
    if name:
        d.find_element(By.ID, "recover-name").send_keys(name)
    return c


def submit_recover():
    d.find_element(By.ID, "recover-submit").click()
    wait("the sessions page", lambda: visible("#page-sessions .session.highlight"))
    return d.find_element(By.CSS_SELECTOR, "#page-sessions .session.highlight").get_attribute("data-id")


def step_recover_and_migrate():
    step_recover(args["vm"])
    both("recover")
    sid = submit_recover()
    sel = f".session[data-id='{sid}']"
    wait("the session running", lambda: card_state(card(sel)) == "running")
    name = card(sel).find_element(By.CSS_SELECTOR, ".session-name").text
    assert name == f"{args['vm']}-ir", name
    log(f"session {sid} ({name}) running")
    shot("sessions-running")

    dialog = click_action(card(sel), "migrate")
    dialog.find_element(By.ID, "dialog-to").send_keys(args["dest"])
    assert js("return document.getElementById('dialog-method').value") == "copy"
    dialog.find_element(By.CSS_SELECTOR, "button[data-role='confirm']").click()

    seen = []
    shots_taken = False
    deadline = time.time() + MIGRATION
    while True:
        c = card(sel)
        state = card_state(c)
        bar = c.find_elements(By.CSS_SELECTOR, ".progress") if c else []
        pct = int(bar[0].get_attribute("aria-valuenow")) if bar and bar[0].is_displayed() else None
        if pct is not None and (not seen or seen[-1] != (state, pct)):
            seen.append((state, pct))
            if 0 < pct < 100 and not shots_taken and state == "migrating":
                both("sessions-migrating")
                shots_taken = True
        if state == "done":
            break
        if state in ("failed", "waiting", "cancelled"):
            raise AssertionError(f"migration ended {state}: {page_text()}")
        if time.time() > deadline:
            raise AssertionError(f"migration not done after {MIGRATION} s; seen {seen}\n{page_text()}")
        time.sleep(0.1)
    log(f"progress seen: {seen}")
    between = [p for s, p in seen if 0 < p < 100]
    assert between, f"the progress bar never showed a value between 0 and 100: {seen}"
    assert [p for _, p in seen] == sorted(p for _, p in seen), f"progress went backwards: {seen}"
    final = card(sel)
    assert final.find_element(By.CSS_SELECTOR, ".progress").get_attribute("aria-valuenow") == "100"
    assert "done" in final.find_element(By.CSS_SELECTOR, "[data-field='state']").text
    assert not final.find_element(By.CSS_SELECTOR, "button[data-action='stop']").is_displayed()
    shot("sessions-done")
    log("migration done, progress bar at 100")


def step_xss_fails():
    """Recovering the VM named with markup: its session (named after it)
    fails to publish (a '/' cannot be in a folder name); name and error are
    text. Retry runs the step again. The session stays, failed, beside the
    migration that follows (and in its screenshot)."""
    step_recover(args["xss_vm"])
    sid = submit_recover()
    sel = f".session[data-id='{sid}']"
    wait("the markup session failed", lambda: card_state(card(sel)) == "failed")
    c = card(sel)
    assert c.find_element(By.CSS_SELECTOR, ".session-name").text == f"{args['xss_vm']}-ir"
    assert c.find_element(By.CSS_SELECTOR, "[data-field='vm']").text == args["xss_vm"]
    assert c.find_element(By.CSS_SELECTOR, "[data-field='error']").text.startswith("publishing:")
    assert js("return document.querySelectorAll('#app script').length") == 0
    no_dialog()
    shot("sessions-failed")

    dialog = click_action(c, "retry")
    dialog.find_element(By.CSS_SELECTOR, "button[data-role='confirm']").click()
    wait("the retried step to fail again", lambda: card_state(card(sel)) == "failed"
         and not visible("dialog.confirm[open]"))
    args["xss_session"] = sel
    log("markup session: name and error as text; retry runs the step again")


def step_xss_stop():
    """Stop, cancelled once at the confirmation, then confirmed."""
    d.get(args["url"] + "#/sessions")
    sel = args["xss_session"]
    wait("the markup session", lambda: card_state(card(sel)) == "failed")
    dialog = click_action(card(sel), "stop")
    dialog.find_element(By.CSS_SELECTOR, "button[data-role='cancel']").click()
    wait("the dialog to close", lambda: not visible("dialog.confirm[open]"))
    time.sleep(1.5)  # more than one refresh: nothing was asked of the API
    assert card_state(card(sel)) == "failed", "cancelling the confirmation must not stop the session"
    dialog = click_action(card(sel), "stop")
    dialog.find_element(By.CSS_SELECTOR, "button[data-role='confirm']").click()
    wait("the session cancelled", lambda: card_state(card(sel)) == "cancelled")
    no_dialog()
    log("stop: cancelled at the confirmation, then confirmed: session cancelled")


def step_metrics():
    d.get(args["url"] + "#/metrics")
    wait("the metrics tiles", lambda: visible("#tile-nfs-read") and visible("#tile-migration"))
    wait("two samples in the chart", lambda: int(
        js("return document.getElementById('chart-throughput').dataset.samples || '0'")) >= 2)
    migrated = d.find_element(By.CSS_SELECTOR, "#tile-migration [data-field='sub']").text
    assert not migrated.startswith("0 B"), migrated
    assert visible("#tile-hit-ratio"), "block cache hit ratio tile"
    both("metrics")
    log(f"metrics: {migrated}")


def step_refused_token():
    """The server no longer takes the tab's token (changed in the config,
    say): the next refresh returns to the login page with an error."""
    d.get(args["url"] + "#/sessions")
    wait("the sessions page", lambda: visible("#page-sessions"))
    js("sessionStorage.setItem('revive-token', 'changed-on-the-server')")
    err = wait("the login page after a refused token", lambda: visible("#login-error"))
    assert "refused" in err.text, err.text
    assert js("return sessionStorage.length") == 0
    shot("login-token-refused")
    login(args["token"])
    wait("the sessions page again", lambda: visible("#page-sessions .session"))
    d.find_element(By.ID, "logout").click()
    wait("the login page after logging out", lambda: visible("#login"))
    assert js("return sessionStorage.length") == 0
    log("refused token and log out: login page, token forgotten")


def check_console_log():
    problems = []
    for entry in d.get_log("browser"):
        msg = entry.get("message", "")
        console_log.append(msg)
        if entry.get("level") != "SEVERE":
            continue
        # The wrong-token steps expect refused requests.
        if " 401 " in msg or "(Unauthorized)" in msg:
            continue
        problems.append(msg)
    assert not problems, "browser console errors:\n" + "\n".join(problems)


try:
    for step in [step_login, step_overview, step_xss_fails, step_recover_and_migrate,
                 step_xss_stop, step_metrics, step_refused_token]:
        step()
        token_not_in_url()
        no_dialog()
        check_console_log()
    print("console test: done", flush=True)
except BaseException:
    try:
        shot("failure")
        log("browser console:\n" + "\n".join(console_log + [e.get("message", "") for e in d.get_log("browser")]))
    except Exception as e:
        log(f"(no failure screenshot: {e})")
    raise
finally:
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)
