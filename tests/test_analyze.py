"""`python -m dasd_jax.analyze` on the tiny variant: tables, a plot and a valid token page."""

import json
from html.parser import HTMLParser

import pytest

from dasd_jax import analyze, rewrite
from dasd_jax.errors import UserError
from dasd_jax.tools import screenshot
from configs import math as math_config


class TagBalance(HTMLParser):
    """Checks that every opened element is closed in order, and collects token spans."""

    VOID = {"meta", "br", "img", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.spans, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "span" and dict(attrs).get("title"):
            self.spans.append(dict(attrs))

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("analysis")
    config = math_config.get_config("tiny")
    config.workdir = str(workdir)
    config.rewrite.update(generated_examples=6, batch_size=6, max_new_tokens=16)
    rewrite.rewrite(config)
    config.analyze.examples = 3
    return workdir, analyze.analyze(config)


@pytest.mark.slow
def test_analysis_counts_every_response_token_into_one_category(analysis):
    _, stats = analysis
    assert set(stats) == {"references", "rewrites"}
    for numbers in stats.values():
        assert numbers["records"] == 6
        assert sum(numbers[c] for c in analyze.CATEGORIES) == numbers["tokens"]
        assert 0 <= numbers["high_ppl_100"] <= numbers["high_ppl_10"] <= 1


@pytest.mark.slow
def test_analysis_writes_a_summary_a_plot_and_a_well_formed_token_page(analysis):
    workdir, stats = analysis
    output = workdir / "analysis"
    assert json.loads((output / "summary.json").read_text()) == json.loads(json.dumps(stats))
    assert (output / "confidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = TagBalance()
    page.feed((output / "tokens.html").read_text(encoding="utf-8"))
    page.close()
    assert page.errors == [] and page.stack == []
    assert len(page.spans) > 100
    classes = {span["class"] for span in page.spans}
    assert classes <= set(analyze.CATEGORIES) and "aligned" in classes
    assert "structural" in classes  # every reference ends with its eos token
    assert all(span["title"].split(":")[0] == span["class"] and " b=" in span["title"]
               and " q=" in span["title"] and " r=" in span["title"] for span in page.spans)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(screenshot.find_browser() is None,
                    reason="no Chromium-family browser on PATH (apt install chromium)")
def test_the_token_page_renders_in_a_browser_in_its_category_colours(analysis, tmp_path):
    from PIL import Image

    workdir, _ = analysis
    png = screenshot.screenshot(workdir / "analysis" / "tokens.html", tmp_path / "page.png",
                                width=900, height=700)
    image = Image.open(png).convert("RGB")
    assert image.size == (900, 700)
    shown = {colour for _, colour in image.getcolors(maxcolors=900 * 700)}
    for category in ("aligned", "structural"):
        colour = analyze.CATEGORY_COLORS[category]
        assert tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)) in shown, category


def test_a_screenshot_of_a_missing_page_names_it(tmp_path):
    with pytest.raises(UserError, match=r"nope.html: no such page"):
        screenshot.screenshot(tmp_path / "nope.html", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_sources_must_name_a_path():
    with pytest.raises(UserError, match=r"'refs' is not name=path"):
        analyze.parse_sources("refs")
    assert analyze.parse_sources("a=x.jsonl@reference, b=y.jsonl") == [
        ("a", "x.jsonl", "reference"), ("b", "y.jsonl", "response")]
