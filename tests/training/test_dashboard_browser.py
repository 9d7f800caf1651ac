"""The dashboard (/ui) in headless Chromium over a real asr-grpo job: the page asks for the gateway's
token, the lease timeline draws every holder of the shared device (encoder, rollout, trainer) and a
killed holder's expiry, the reward chart grows as steps finish, and the page's cancel button stops the
job. No console error along the way; a screenshot is kept in the test's tmp dir."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from speechrl.services.lease import lease_redis
from speechrl.services.lease.status import lease_events
from tests.support.dashboard import (
    LEASE_DEVICE,
    DashboardStack,
    chromium,
    console_errors,
    dashboard_stack,
    kill_a_lease_holder,
    open_dashboard,
    save_screenshot,
    wait_for,
)
from tests.support.servers import RedisServer

TOKEN = "dashboard-token"


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[DashboardStack]:
    with dashboard_stack(tmp_path / "stack", redis_server.url, auth_tokens=TOKEN) as running:
        yield running


def points(driver: Any, series: str = "reward_mean") -> int:
    return len(driver.find_elements("css selector", f'#chart-reward circle.point[data-series="{series}"]'))


def texts(driver: Any, selector: str) -> list[str]:
    """Text of the elements at selector, read in one script (the page redraws its tables every poll)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)


def timeline(driver: Any) -> list[dict[str, str]]:
    """The segments the page draws for the shared device, as their data attributes."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll(arguments[0])].map(r => Object.assign({}, r.dataset))",
        f'.device[data-device="{LEASE_DEVICE}"] rect.segment')


def owners_in_redis(redis_url: str) -> set[str]:
    async def read() -> set[str]:
        client = lease_redis(redis_url)
        try:
            return {e.owner for e in await lease_events(client, LEASE_DEVICE)}
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_the_dashboard_follows_a_job_and_the_lease_in_a_real_browser(stack: DashboardStack, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get(f"{stack.gateway}/ui")
        assert wait_for(driver.find_element(By.ID, "token-form").is_displayed, 15, "the token form")
        assert driver.find_elements(By.CSS_SELECTOR, "#services tbody tr") == []  # no data before the token
        open_dashboard(driver, stack.gateway, TOKEN)
        assert driver.execute_script("return sessionStorage.getItem('speechrl-dashboard-token')") == TOKEN
        Select(driver.find_element(By.ID, "window")).select_by_value("900")  # the whole test fits in the window
        names = wait_for(lambda: texts(driver, "#services tbody tr td:first-child"), 15, "the services panel")
        assert sorted(names) == ["encoder", "rollout", "rules"]

        job_id = stack.submit(tmp_path / "run", steps=30)
        first = wait_for(lambda: points(driver), 300, "the first step on the reward chart")
        later = wait_for(lambda: points(driver) > first and points(driver), 300, "more steps on the reward chart")
        assert later > first >= 1
        assert driver.find_element(By.ID, "job-id").text == job_id
        assert driver.find_elements(By.CSS_SELECTOR, '#chart-time rect.bar[data-series="time/rollout"]')

        driver.find_element(By.ID, "cancel-job").click()
        wait_for(lambda: driver.find_element(By.ID, "job-status").get_attribute("data-status") == "cancelled", 300,
                 "the job to show as cancelled")
        assert stack.job(job_id)["status"] == "cancelled"
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#checkpoints tbody td.num"), 15, "its checkpoints")

        kill_a_lease_holder(stack.redis_url)
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, '.expiry[data-kind="expire"][data-owner="holder"]'), 15,
                 "the killed holder's expiry on the timeline")
        expected = owners_in_redis(stack.redis_url)  # every holder the lease recorded since the stack started
        drawn = wait_for(lambda: (segments := timeline(driver)) and {s["owner"] for s in segments} >= expected
                         and segments, 15, f"segments of {sorted(expected)}")
        assert {s["owner"] for s in drawn} == expected
        roles = {s["role"] for s in drawn}
        assert {"encoder", "rollout", "trainer", "holder", "after-crash"} <= roles, roles
        assert any(s["owner"] == "holder" and s["end"] == "expire" for s in drawn)

        shot = save_screenshot(driver, tmp_path / "dashboard.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        errors = console_errors(driver)
        assert not errors, errors
