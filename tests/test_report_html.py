"""samlib.report.html: the index page of a fake results folder, read back with an HTML parser."""
import json
from html.parser import HTMLParser

import pytest

from samlib.report.html import INDEX_FIGURES, write_index

EVIL = "<script>alert(1)</script>"


class Page(HTMLParser):
    """What a reader sees: headings, image attributes, table rows (cell texts), all text."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.images, self.tables, self.text = [], [], [], []
        self._heading = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2", "h3"):
            self._heading = [tag, ""]
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading:
            self.headings.append(tuple(self._heading))
            self._heading = None
        elif tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading[1] += data
        if self._cell is not None:
            self._cell += data

    def table_after(self, heading: str):
        """Rows (lists of cell texts) of the first table whose first cell is `heading`."""
        return next(t for t in self.tables if t and t[0] and t[0][0] == heading)


@pytest.fixture
def results(tmp_path):
    """A results/<profile> folder: summary.json, table1 (rows), temperature (header only),
    one of the figures, one notebook page."""
    folder = tmp_path / "quick"
    (folder / "html").mkdir(parents=True)
    summary = {"profile": "quick", "data_source": EVIL, "device": "cpu (x86_64, 2 threads)",
               "commit": "0123456789abcdef", "commit_dirty": True, "torch": "2.4.0", "seeds": [84, 85],
               "updated": "2026-01-01 12:00:00",
               "timings": {"00_data_exploration": 7.5, "01_table1_ablation": 1837.4}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "table1.csv").write_text("configuration,params,test %\n"
                                       "Baseline ResNet,4697162,45.159998\n"
                                       "+ SE blocks,4733610,12345.678\n")
    (folder / "temperature.csv").write_text("strategy,temperature,test_accuracy\n")
    (folder / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "html" / "01_table1_ablation.html").write_text("<html></html>")
    return folder


@pytest.fixture
def page(results):
    path = write_index(results)
    assert path == results / "html" / "index.html"
    assert not list(path.parent.glob(".*.tmp"))            # written atomically: no temporary left
    return path.read_text(encoding="utf-8")


def test_title_headings_and_notebook_links(page):
    parsed = Page(page)
    assert "<title>SAMResNets reproduction (quick)</title>" in page
    h2 = [text for tag, text in parsed.headings if tag == "h2"]
    assert {"Provenance", "Time per notebook", "Notebooks", "Tables", "Figures"} <= set(h2)
    h3 = [text for tag, text in parsed.headings if tag == "h3"]
    assert "Table 1 rebuilt" in h3 and "Temperature scaling" in h3
    assert "Paper/code switches on the final config" not in h3        # no discrepancies.csv
    assert '<a href="01_table1_ablation.html">01_table1_ablation</a>' in page
    assert "Scaled-down profile" in page


def test_timings_are_table_rows_with_seconds(page):
    timings = Page(page).table_after("notebook")
    assert timings[0] == ["notebook", "seconds"]
    assert ["00_data_exploration", "7.5"] in timings
    assert ["01_table1_ablation", "1,837.4"] in timings
    assert timings[-1] == ["total", "1,844.9"]
    assert "{'00_data_exploration'" not in page and "{&#39;00_data_exploration" not in page   # no raw dict


def test_table_numbers_have_thousands_separators(page):
    table1 = Page(page).table_after("configuration")
    assert table1[0] == ["configuration", "params", "test %"]
    assert table1[1] == ["Baseline ResNet", "4,697,162", "45.16"]
    assert table1[2] == ["+ SE blocks", "4,733,610", "12,345.68"]


def test_table_without_rows_says_it_is_empty(page):
    parsed = Page(page)
    assert "This table is empty: temperature.csv has no rows." in "".join(parsed.text)
    assert not any(t and t[0] == ["strategy", "temperature", "test_accuracy"] for t in parsed.tables)


def test_images_only_for_existing_figures_each_with_alt_text_heading_and_caption(page):
    parsed = Page(page)
    assert [img["src"] for img in parsed.images] == ["../training_curves.png"]
    figure = next(f for f in INDEX_FIGURES if f.name == "training_curves")
    assert parsed.images[0]["alt"] == figure.alt and figure.alt
    assert ("h3", figure.title) in parsed.headings
    assert figure.caption in "".join(parsed.text)
    for missing in (f for f in INDEX_FIGURES if f.name != "training_curves"):
        assert f"{missing.name}.png" not in page and ("h3", missing.title) not in parsed.headings


def test_summary_text_is_escaped(page):
    assert EVIL not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    provenance = Page(page).table_after("profile")
    assert ["data_source", EVIL] in provenance                 # shown as text to the reader
    assert ["commit_dirty", "yes"] in provenance and ["seeds", "84, 85"] in provenance


def test_csv_text_is_escaped(results):
    (results / "discrepancies.csv").write_text(f"switch,test_acc\n{EVIL},1.5\n")
    page = write_index(results).read_text(encoding="utf-8")
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_no_summary_and_no_outputs_still_give_a_page(tmp_path):
    page = write_index(tmp_path).read_text(encoding="utf-8")
    parsed = Page(page)
    assert ["profile", "not recorded"] in parsed.table_after("profile")
    text = "".join(parsed.text)
    assert "No notebook has recorded its time yet." in text and "No figures yet." in text
    assert parsed.images == []


def test_the_page_starts_with_the_scale_and_the_headline(results):
    summary = dict(json.loads((results / "summary.json").read_text()), seeds=[84])   # Table 1's seeds only
    summary["scale"] = [{"config": "baseline", "seeds": [84], "trained_in": "fp32", "training_images": 45000,
                         "epochs": 20, "widths": [16, 32, 64], "train_seconds": 3600.0},
                        {"config": "final", "seeds": [84, 85], "trained_in": "bf16, fp32", "training_images": 45000,
                         "epochs": 20, "widths": [16, 32, 64], "train_seconds": 5400.0}]
    (results / "summary.json").write_text(json.dumps(summary, sort_keys=True))
    (results / "figure1_by_seed.csv").write_text(
        "claim,paper,seed 84,seed 84 95% interval,seed 85,seed 85 95% interval,mean,sd,reading\n"
        "TTA gain: tta - standard,0.31,0.63,0.35 - 0.90,0.52,0.25 - 0.79,0.575,0.0778,supported\n")
    (results / "table1_claims.csv").write_text("claim,paper,seed 84,seed 84 95% interval,mean,sd,reading\n"
                                               "+ SE blocks gain: se - baseline,0.62,0.2,-0.4 - 0.8,0.2,,cannot resolve\n")
    page = write_index(results).read_text(encoding="utf-8")
    parsed = Page(page)
    h2 = [text for tag, text in parsed.headings if tag == "h2"]
    assert h2.index("Scale") < h2.index("Provenance") and h2[1].startswith("Headline")
    text = " ".join("".join(parsed.text).split())
    assert "3 training runs, trained in bf16, fp32; 2 h 30 min of training, summed over the runs." in text
    scale = parsed.table_after("config")
    assert scale[0] == ["config", "seeds", "trained in", "training images", "epochs", "widths", "train seconds"]
    assert scale[2] == ["final", "84, 85", "bf16, fp32", "45,000", "20", "16, 32, 64", "5,400.00"]
    assert parsed.table_after("claim")[1] == ["+ SE blocks gain: se - baseline", "0.62", "0.20", "-0.4 - 0.8",
                                               "0.20", "", "cannot resolve"]     # Table 1's gains first
    figure1 = [table for table in parsed.tables if table[0][:3] == ["claim", "paper", "seed 84"]][1]
    assert figure1[1] == ["TTA gain: tta - standard", "0.31", "0.63", "0.35 - 0.90", "0.52", "0.25 - 0.79",
                          "0.57", "0.08", "supported"]
    assert parsed.table_after("Table 1 row")[1] == ["Baseline ResNet", "45.16"]     # the columns table1.csv has
    assert ["seeds", "84, 85"] in parsed.table_after("profile")                 # every run's seed
