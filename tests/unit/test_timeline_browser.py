"""The timeline's HTML page in a real browser: Debian's chromium, headless.

Each page is opened from a copy with a probe script first in its head: it records every script
error (``window`` ``error`` events) in an attribute of ``<html>``, and on load counts the region
bars the browser laid out (a box wider and taller than zero) and clicks the first one, counting
the table rows the page's own script then marks. ``--dump-dom`` prints the DOM after load, the
attributes with it. A page with a broken script shows the probe catches errors.

chromium runs in its own process group (it starts zygote and utility processes), bounded by
:data:`TIMEOUT`; the group is killed if anything of it is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vhostmem.timeline import Story, render_html, replay

from .test_timeline import _legacy_lines, _plug_cycle

TIMEOUT = 60.0

PROBE = """<script>
(function () {
  var root = document.documentElement;
  window.addEventListener("error", function (event) {
    var seen = root.getAttribute("data-script-errors") || "";
    root.setAttribute("data-script-errors", seen + event.message + " (line " + event.lineno + ");");
  });
  window.addEventListener("load", function () {
    var shown = 0;
    document.querySelectorAll("rect.region").forEach(function (bar) {
      var box = bar.getBoundingClientRect();
      if (box.width > 0 && box.height > 0) { shown += 1; }
    });
    root.setAttribute("data-bars-shown", String(shown));
    var first = document.querySelector("rect.region");
    if (first) { first.dispatchEvent(new MouseEvent("click", {bubbles: true})); }
    root.setAttribute("data-rows-marked", String(document.querySelectorAll("tr.sel").length));
  });
})();
</script>"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: apt-get install -y chromium (tools/setup-host does); "
            "the HTML timeline is checked in a real headless browser"
        )
    return path


class _Root(HTMLParser):
    """The attributes of the dumped DOM's ``<html>`` element."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "html":
            self.attrs = {k: v or "" for k, v in attrs}


def open_in_chromium(page: str, tmp_path: Path) -> dict[str, str]:
    """Load ``page`` (with the probe) in headless chromium; the ``<html>`` attributes after
    load."""
    marker = '<meta charset="utf-8">'
    assert marker in page
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace(marker, marker + PROBE, 1), encoding="utf-8")
    argv = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        probed.as_uri(),
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group: its children are killed with it
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not print the page's DOM within {TIMEOUT:g} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    root = _Root()
    root.feed(out.decode())
    assert "data-bars-shown" in root.attrs, (
        "the probe did not run: " + out.decode()[:500] + err.decode(errors="replace")[-2000:]
    )
    return root.attrs


def _marked(story: Story) -> int:
    """Rows a click on the first bar marks: the requests that mapped and unmapped it."""
    first = story.mappings[0]
    return sum(1 for seq in (first.added_by, first.removed_by) if seq)


@pytest.mark.parametrize(
    "story", [_plug_cycle(), replay(_legacy_lines())], ids=["plug-cycle", "legacy-violations"]
)
def test_page_renders_in_chromium_without_script_errors(story: Story, tmp_path: Path) -> None:
    attrs = open_in_chromium(render_html(story), tmp_path)
    assert attrs.get("data-script-errors", "") == ""
    assert int(attrs["data-bars-shown"]) == len(story.mappings) == 4
    assert int(attrs["data-rows-marked"]) == _marked(story) >= 1


def test_the_probe_sees_a_script_error(tmp_path: Path) -> None:
    page = render_html(_plug_cycle()).replace(
        "</body>", "<script>noSuchFunction();</script></body>"
    )
    attrs = open_in_chromium(page, tmp_path)
    assert "noSuchFunction" in attrs["data-script-errors"]
