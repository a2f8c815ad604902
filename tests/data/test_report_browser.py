"""A fake-engine run's report.html opened in headless Chromium (Debian's chromium + chromium-driver, driven through
selenium): the counts the page shows (its data-* cells, as rendered) equal the manifest's, the charts load, the
model output holding HTML stays text (no element of it in the DOM), and the console logs no error. The browser is
stopped by the test: selenium's quit, then a check by process id that neither chromedriver nor a Chromium process
it started outlived it.

Without the browser or selenium the test skips saying so; with STAGE1_BROWSER_TESTS=require (.ci/run sets it) it
fails instead."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from stage1.data.report import REPORT_FILE

from report_runs import HOSTILE, RUN, charts_expected, manifest_counts, with_html

REQUIRED = os.environ.get("STAGE1_BROWSER_TESTS") == "require"


def missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra: pip install -e '.[test]')"
    return None


def descendants(pid: int) -> set[int]:
    """The processes below `pid`, from /proc (Chromium's own children: renderer, GPU, zygote)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def browser():
    """A headless Chromium under chromedriver, logging the console; quit at the end, its processes checked gone."""
    why = missing()
    if why:
        if REQUIRED:
            pytest.fail(f"STAGE1_BROWSER_TESTS=require, but {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=1280,2400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver"))  # this one: selenium fetches nothing
    driver = webdriver.Chrome(service=service, options=options)
    started = {service.process.pid, *descendants(service.process.pid)}
    try:
        yield driver
    finally:
        driver.quit()
        left = sorted(pid for pid in started if alive(pid))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"browser processes outlived quit() (killed by pid): {left}"


def test_the_report_opens_in_chromium_with_the_manifests_counts(gen, make_llm, respond_mixed, out, browser):
    from selenium.webdriver.common.by import By

    assert gen(*RUN, llm=make_llm(respond=with_html(respond_mixed))) == 0
    browser.get((out / REPORT_FILE).resolve().as_uri())
    expected = manifest_counts(out)
    assert len(expected["reasons"]) >= 4 and expected["reasons"]["near_duplicate"] >= 5

    def shown(attribute: str) -> dict[str, int]:
        return {e.get_attribute(f"data-{attribute}"): int(e.text)
                for e in browser.find_elements(By.CSS_SELECTOR, f"[data-{attribute}]")}
    counts = shown("count")
    assert {"kept": counts["kept"], "rejected": counts["rejected"], "reasons": shown("reason-count")} == expected

    # the model's markup is text on the page, never an element of it
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.title.startswith("stage1 report") and "pwned" not in browser.title
    assert HOSTILE in browser.find_element(By.TAG_NAME, "body").text
    charts = browser.find_elements(By.CSS_SELECTOR, "img.chart")
    assert len(charts) == charts_expected(out)
    assert all(browser.execute_script("return arguments[0].naturalWidth", chart) > 0 for chart in charts)  # loaded
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
