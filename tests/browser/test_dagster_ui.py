"""What an operator sees in the Dagster UI after one micro-batch and one sweep.

One batch of uploads (three events and a malformed message) goes through the real sensor and run
into the test's own instance; the sweeper's checks run once. A webserver of the test's own then
serves that instance and headless Chromium checks the asset graph, the run, the ``events``
asset with its numbers and its map, the checks and the sensor. Screenshots go to
``test-artifacts/screenshots/`` (the operator guide embeds some of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Page, expect

from snapmap_pipeline.jobs import SWEEPER_JOB_NAME
from tests.browser.conftest import SCREENSHOTS
from tests.integration.pipeline import Harness, publish, upload

pytestmark = pytest.mark.browser

ASSET_GROUPS = {
    "ingest": ["photo_uploads"],
    "clustering": ["events", "photo_event_links"],
    "publish": ["event_updates", "consumer_offsets"],
    "backfill": ["daily_events"],
}
CHECKS = {
    "events": ["event_photo_counts", "tombstone_targets", "event_manifests_exist"],
    "photo_event_links": ["orphan_photos", "storage_urls_exist"],
}
WAIT_MS = 30_000
# Playwright's expect() has its own timeout (5 s), apart from the page's default: on a loaded
# machine the asset graph took longer than that to draw in a clean-clone CI check.
expect.set_options(timeout=WAIT_MS)


def batch_of_uploads() -> list[bytes]:
    """Eight photos in three events (four within 25 m, three 150 m east of them, one 300 m
    north) and a malformed message, all taken within two minutes."""
    places = [
        (81.77240, 25.43020),
        (81.77262, 25.43031),
        (81.77251, 25.43009),
        (81.77230, 25.43035),
        (81.77390, 25.43080),
        (81.77405, 25.43072),
        (81.77398, 25.43093),
        (81.77300, 25.43300),
    ]
    uploads = [
        upload(f"ui-{n}", f"2026-01-17T13:2{n // 4}:{n * 7:02d}Z", lon, lat)
        for n, (lon, lat) in enumerate(places)
    ]
    return [*uploads, b'{"photoId": "ui-bad", "timestamp": "yesterday"}']


@contextmanager
def screen(page: Page, name: str) -> Iterator[None]:
    """Screenshot ``name`` once the block's assertions pass, or ``name-failed`` when they do
    not (the page as the assertion saw it)."""
    try:
        yield
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / f"{name}-failed.png"))
        raise
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def test_operator_views(webserver, dagster_instance, resources, kafka, settings, browser_page):
    publish(kafka, settings.uploads_topic, batch_of_uploads(), partition=0)
    harness = Harness(dagster_instance, resources)
    requests = harness.tick()
    offsets_key = f"{settings.uploads_topic}/0/0-8@{kafka.topic_id(settings.uploads_topic)}"
    assert [r.run_key for r in requests] == [offsets_key]
    run_id = harness.execute(requests[0]).run_id
    sweep = harness.definitions.resolve_job_def(SWEEPER_JOB_NAME)
    assert sweep.execute_in_process(instance=dagster_instance).success

    webserver.wait_until_ready()
    page = browser_page
    page.set_default_timeout(WAIT_MS)

    with screen(page, "asset-graph"):
        page.goto(f"{webserver.url}/asset-groups")
        graph = page.locator("[data-svg-viewport]")
        expect(graph.get_by_text("clustering", exact=True)).to_be_visible()
        page.locator('[aria-label="settings"]').last.click()
        page.get_by_role("menuitem", name="Expand all groups").click()
        page.keyboard.press("Escape")
        for group, assets in ASSET_GROUPS.items():
            expect(graph.get_by_text(group, exact=True)).to_be_visible()
            for asset in assets:
                expect(graph.get_by_text(asset, exact=True).first).to_be_visible()

    with screen(page, "runs"):
        page.goto(f"{webserver.url}/runs")
        expect(page.get_by_text("snapmap/offsets: 0-8")).to_be_visible()
        expect(page.get_by_text("sweeper", exact=True).first).to_be_visible()

    with screen(page, "run"):
        page.locator(f'a[href="/runs/{run_id}"]').first.click()
        expect(page).to_have_url(f"{webserver.url}/runs/{run_id}")
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        expect(page.get_by_text("ingest_photo_uploads").first).to_be_visible()
        page.get_by_placeholder("Filter…").fill("consumer_offsets")
        expect(page.get_by_text("offset_range").first).to_be_visible()
        expect(page.get_by_text(offsets_key, exact=True).first).to_be_visible()

    with screen(page, "events-asset"):
        page.goto(f"{webserver.url}/assets/events")
        for name, value in [("events_created", "3"), ("seed_photos", "8"), ("radius_m", "50")]:
            row = page.locator("tr", has=page.get_by_text(name, exact=True))
            expect(row.locator("td").last).to_have_text(value)
        expect(page.get_by_text("ingest_photo_uploads").first).to_be_visible()

    with screen(page, "event-map"):
        row = page.locator("tr", has=page.get_by_text("event_map", exact=True))
        row.get_by_text("[Show Markdown]").click()
        image = page.get_by_role("dialog").locator('img[src^="data:image/png;base64,"]')
        expect(image).to_be_visible()
        expect(image).to_have_attribute("alt", "event map: 8 photos, 3 events")
        assert image.evaluate("img => img.complete && img.naturalWidth > 100")

    for asset, checks in CHECKS.items():
        with screen(page, f"checks-{asset}"):
            page.goto(f"{webserver.url}/assets/{asset}?view=checks")
            for check in checks:
                expect(page.get_by_text(check, exact=True).first).to_be_visible()
            expect(page.get_by_text("Succeeded").first).to_be_visible()

    # The sample's blobs were never uploaded: the storage check fails with a warning and says so.
    with screen(page, "check-storage-urls-failed"):
        page.get_by_text("storage_urls_exist", exact=True).first.click()
        expect(page.get_by_text("Failed").first).to_be_visible()
        expect(page.get_by_text("8 photos have no blob").first).to_be_visible()

    with screen(page, "sensor"):
        page.goto(f"{webserver.url}/locations/snapmap/sensors/photo_uploads_sensor")
        expect(page.get_by_text("Turns new photo-uploads offsets").first).to_be_visible()
        expect(page.get_by_text("Loading ticks")).to_have_count(0)
        expect(page.get_by_text("ingest_photo_uploads").first).to_be_visible()

    with screen(page, "automation"):
        page.goto(f"{webserver.url}/overview/automation")
        expect(page.get_by_text("photo_uploads_sensor").first).to_be_visible()
        expect(page.get_by_text("sweeper_schedule").first).to_be_visible()
