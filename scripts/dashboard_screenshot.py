"""A screenshot of the gateway's dashboard (/ui) for the README: docs/images/dashboard.png.

    .venv/bin/python scripts/dashboard_screenshot.py                  # a tiny training stack of its own (~1 min)
    .venv/bin/python scripts/dashboard_screenshot.py --url http://127.0.0.1:8000 [--token T]   # a running stack

Its own stack is the browser test's (tests/support/dashboard.py): a private redis-server; the rules,
encoder and rollout services, the last two sharing the lease of cpu:0 with the trainer; the trainer's
job API and the gateway. A small asr-grpo job runs, a lease holder is killed mid-run (its expiry shows
on the timeline), the page is captured in headless Chromium (Debian's chromium, driven by selenium),
and the job is cancelled. Needs the dev requirements (selenium) and scripts/bootstrap.sh's packages.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The stack and the browser of the dashboard's test, one copy for both. Imported by name: tests/ is
# outside mypy's files, and a static import would have mypy check it from here.
support = importlib.import_module("tests.support.dashboard")
servers = importlib.import_module("tests.support.servers")
chromium, console_errors, open_dashboard, save_screenshot, wait_for = (
    support.chromium, support.console_errors, support.open_dashboard, support.save_screenshot, support.wait_for)


def capture(url: str, token: str, out: Path, profile: Path, window_s: int, before: float = 3.0) -> Path:
    """Open the dashboard at url, let it draw a few polls over window_s seconds, save it to out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with chromium(profile) as driver:
        open_dashboard(driver, url, token)
        Select(driver.find_element(By.ID, "window")).select_by_value(str(window_s))
        time.sleep(before)
        shot = save_screenshot(driver, out)
        errors = console_errors(driver)
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")
    return shot


def own_stack(out: Path, steps: int) -> Path:
    """The demo: a job on a private stack, a killed lease holder, the screenshot, then the job cancelled."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="speechrl-dashboard-") as tmp:
        root = Path(tmp)
        redis = servers.RedisServer(root)
        redis.start()
        redis.declare_clean()
        try:
            with support.dashboard_stack(root / "stack", redis.url) as stack:
                job_id = stack.submit(root / "run", steps=steps)
                wait_for(lambda: stack.job(job_id)["step"] >= steps // 3, 600, "a third of the steps")
                support.kill_a_lease_holder(stack.redis_url)
                wait_for(lambda: stack.job(job_id)["step"] >= (2 * steps) // 3, 600, "two thirds of the steps")
                shot = capture(stack.gateway, "", out, root / "chromium-profile", window_s=60)
                httpx.post(f"{stack.trainer}/v1/jobs/{job_id}/cancel", timeout=30)
                wait_for(lambda: stack.job(job_id)["status"] in ("cancelled", "succeeded"), 300, "the job to stop")
        finally:
            redis.stop()
    return shot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "dashboard.png", help="PNG to write")
    parser.add_argument("--url", default="", help="a running gateway (e.g. http://127.0.0.1:8000); empty: start a "
                                                 "tiny stack of its own")
    parser.add_argument("--token", default="", help="the gateway's bearer token, when it has tokens")
    parser.add_argument("--window", type=int, default=60, choices=[30, 60, 300, 900, 3600],
                        help="seconds of lease timeline shown (with --url)")
    parser.add_argument("--steps", type=int, default=250, help="steps of the demo job (without --url)")
    args = parser.parse_args()
    if args.url:
        with tempfile.TemporaryDirectory(prefix="speechrl-dashboard-") as tmp:
            shot = capture(args.url.rstrip("/"), args.token, args.out, Path(tmp) / "profile", args.window)
    else:
        shot = own_stack(args.out, args.steps)
    print(f"wrote {shot}")


if __name__ == "__main__":
    main()
