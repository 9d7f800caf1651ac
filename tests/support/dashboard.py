"""The dashboard in a real browser, for tests/training/test_dashboard_browser.py and
scripts/dashboard_screenshot.py: headless Chromium driven by selenium, a tiny asr-grpo stack on
loopback whose encoder, rollout and trainer share one leased device, and a lease holder that dies.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`: scripts/bootstrap.sh); nothing
is downloaded, and the browser is started with every background network feature off.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.lease import GpuLease, LeaseSettings, lease_redis
from tests.support.servers import uvicorn_in_thread
from tests.support.training import Stack, asr_job, asr_services, asr_warm_start

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
LEASE_DEVICE = "cpu:0"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.25) -> T:
    """predicate()'s first truthy value within timeout seconds (AssertionError naming `what` after)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# -------------------------------------------------------------------------------------- the browser

@contextmanager
def chromium(profile: Path, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium (selenium WebDriver) with a fresh profile under `profile`, keeping the
    page's console messages for `console_errors`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_binary = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_binary is None:
        raise RuntimeError("chromium and chromedriver are needed (Debian: chromium chromium-driver); "
                           "run scripts/bootstrap.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_binary))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The page's console messages of level SEVERE since the last call (errors and failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def open_dashboard(driver: Any, base_url: str, token: str = "") -> None:
    """Open /ui and, when the gateway asks for one, give the token through the page's own form."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/ui")
    form = driver.find_element(By.ID, "token-form")
    if token:
        wait_for(form.is_displayed, 15, "the page to ask for its token")
        driver.find_element(By.ID, "token-input").send_keys(token)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: driver.find_element(By.ID, "connection").get_attribute("data-state") == "live", 30,
             "the dashboard to go live")


def save_screenshot(driver: Any, path: Path, width: int = 1400) -> Path:
    """The whole page as a PNG at path (Chromium's own full-page capture, not just the window)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, height + 100)
    time.sleep(2.0)  # one more poll, drawn at the new size
    driver.execute_script("window.scrollTo(0, 0)")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    bottom = driver.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom)")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], bottom), "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


# -------------------------------------------------------------------------------------- the stack

@dataclass
class DashboardStack:
    """A gateway (with its dashboard) over a tiny asr-grpo stack and the trainer's job API."""

    services: Stack
    gateway: str  # base URL
    trainer: str  # base URL
    redis_url: str

    def submit(self, out: Path, steps: int) -> str:
        """Submit a small asr-grpo job under the shared lease; its id."""
        payload = {"kind": "asr-grpo", **asdict(asr_job(self.services, out, steps, self.redis_url))}
        reply = httpx.post(f"{self.trainer}/v1/jobs", json=payload, timeout=30)
        reply.raise_for_status()
        return str(reply.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.trainer}/v1/jobs/{job_id}", timeout=30).json())


@contextmanager
def dashboard_stack(root: Path, redis_url: str, auth_tokens: str = "") -> Iterator[DashboardStack]:
    """Warm start, then rules, encoder and rollout (the last two leasing cpu:0), the trainer service
    and the gateway, all on loopback; the gateway knows every one of them and the lease's Redis."""
    from speechrl.trainer.jobs.service import TrainerConfig
    from speechrl.trainer.jobs.service import create_app as trainer_app

    policy, data = asr_warm_start(root)
    with ExitStack() as running:
        services = running.enter_context(asr_services(policy, data, lease_device=LEASE_DEVICE, redis_url=redis_url))
        trainer = running.enter_context(uvicorn_in_thread(trainer_app(TrainerConfig(
            redis_url=redis_url, poll_seconds=0.2, journal_dir=str(root / "journal")))))
        gateway = running.enter_context(uvicorn_in_thread(create_app(GatewayConfig(
            intelligibility="", speaker="", rules=services.rules, encoder=services.encoder, rollout=services.rollout,
            trainer=trainer, redis_url=redis_url, auth_tokens=auth_tokens))))
        yield DashboardStack(services, gateway, trainer, redis_url)


def kill_a_lease_holder(redis_url: str, ttl_ms: int = 1000, next_owner: str = "after-crash") -> None:
    """A separate process takes the device's lease (owner "holder") and is killed while holding it; then
    next_owner acquires, finds the holder lapsed (the lease records the expiry), and releases."""
    worker = Path(__file__).with_name("lease_worker.py")
    proc = subprocess.Popen([sys.executable, str(worker), "hold", redis_url, LEASE_DEVICE, str(ttl_ms)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("granted"), f"lease worker said {line!r}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    async def take_over() -> None:
        lease = GpuLease(lease_redis(redis_url), owner=next_owner, settings=LeaseSettings(ttl_ms=ttl_ms))
        try:
            grant = await lease.acquire(LEASE_DEVICE, timeout=60)
            await lease.release(grant)
        finally:
            await lease.client.aclose()

    asyncio.run(take_over())
