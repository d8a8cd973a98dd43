"""The study page (tuning.study.page) opened in a real headless Chromium through Selenium.

Every listed figure must be an image the browser decoded (naturalWidth > 0), the
page must make no network request (Chromium's performance log), and Chromium's
console must stay free of errors. A control page with an external image and a
failing script shows the same checks catch both.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from heimdall.geometry import default_frame
from heimdall.metrics import covariance_from_sigmas
from tuning.study.page import (
    FIGURES,
    HeldOutView,
    PageData,
    ParetoView,
    Predictions,
    TrialCurve,
    TrialPoint,
    held_out_or_why,
    pareto_view,
    write_page,
)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@dataclass(frozen=True)
class Rendered:
    """What the browser made of a page."""

    figures: dict[str, dict]  # figure id -> the image's natural and rendered size, and whether it decoded
    absent: list[str]  # text of the "not shown" notes
    requests: list[str]  # URLs the page sent requests to, besides itself and its data: images
    console_errors: list[str]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):  # .ci/run installs them: a missing browser there is a broken CI, not a skip
            pytest.fail("chromium or chromium-driver is missing although .ci/run installs them; fix: check its "
                        "apt-get step (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def render(driver: object, path: Path) -> Rendered:
    driver.get_log("performance")  # drop what earlier pages left
    driver.get_log("browser")
    driver.get(path.resolve().as_uri())
    figures = driver.execute_script("""
        const out = {};
        for (const f of document.querySelectorAll('figure')) {
            const img = f.querySelector('img');
            out[f.id] = img ? {complete: img.complete, natural: img.naturalWidth, width: img.getBoundingClientRect().width,
                               height: img.getBoundingClientRect().height} : null;
        }
        return out;""")
    absent = [e.text for e in driver.find_elements("css selector", "p.absent")]
    page = path.resolve().as_uri()
    requests, blocked = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if url != page and not url.startswith("data:"):
                requests[params["requestId"]] = url
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked.add(params["requestId"])  # refused inside the browser (the page's policy): never sent
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return Rendered(figures, absent, [u for r, u in requests.items() if r not in blocked], errors)


def held_out(n: int = 300, seed: int = 0) -> HeldOutView:
    """Transmitters around the network; a model off by ~10 km with honest ellipses, a sharper oracle, the centre."""
    rng = np.random.default_rng(seed)
    frame = default_frame()
    truth = rng.uniform(-90, 90, size=(n, 2))

    def model(name: str, sigma_km: float, rho: float) -> Predictions:
        se, sn = sigma_km * rng.uniform(0.6, 1.4, n), sigma_km * rng.uniform(0.6, 1.4, n)
        cov = covariance_from_sigmas(se, sn, np.full(n, rho))
        noise = np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.standard_normal((n, 2)))
        return Predictions(name, *frame.to_geographic(*(truth + noise).T), cov)

    centre = Predictions("centre", *frame.to_geographic(np.zeros(n), np.zeros(n)),
                         np.broadcast_to(np.diag([60.0**2, 50.0**2]), (n, 2, 2)).copy())
    return HeldOutView(*frame.to_geographic(*truth.T), model("best trial", 10.0, 0.3),
                       (model("oracle", 6.0, -0.2), centre), title="synthetic, test split")


def page_data(**changes: object) -> PageData:
    curves = [TrialCurve("#0", "COMPLETE", [1, 2, 3, 4], [5.1, 4.6, 4.4, 4.3]),
              TrialCurve("#1", "PRUNED", [1], [6.0]),
              TrialCurve("#2", "COMPLETE", [1, 2, 3, 4], [5.0, 4.4, 4.1, 4.0]),
              TrialCurve("#3", "PRUNED", [1, 2], [5.4, 5.2]),
              TrialCurve("#4", "FAIL", [1], [7.5])]
    points = [TrialPoint(0, "COMPLETE", (4.3,)), TrialPoint(1, "PRUNED", (6.0,)), TrialPoint(2, "COMPLETE", (4.0,)),
              TrialPoint(3, "PRUNED", (5.2,)), TrialPoint(4, "FAIL", None)]
    data = PageData(study="page-test", objectives=("val/nll_km",), directions=("minimize",), best=2, curves=curves,
                    points=points, importances={"lr": 0.6, "width": 0.3, "dropout": 0.1}, held_out=held_out(),
                    facts=[("Optuna trials", "complete 2, pruned 2, fail 1")])
    return replace(data, **changes)


def test_every_figure_renders_without_requests_or_console_errors(browser: object, tmp_path: Path) -> None:
    values = [(5.0, 1.0), (4.6, 1.8), (4.8, 2.5), (4.2, 3.0), (4.4, 3.5), (3.9, 5.0)]
    two = [TrialPoint(i, "COMPLETE", v) for i, v in enumerate(values)]
    data = page_data(objectives=("val/nll_km", "latency_ms"), directions=("minimize", "minimize"), points=two,
                     pareto=ParetoView(("val/nll_km", "latency_ms"), dict(enumerate(values)), front=[0, 1, 3, 5],
                                       chosen=3))
    path = write_page(data, tmp_path / "report.html")
    shown = render(browser, path)
    assert sorted(shown.figures) == sorted(FIGURES)
    for fig_id, img in shown.figures.items():
        assert img and img["complete"] and img["natural"] > 0, (fig_id, img)
        assert img["width"] > 100 and img["height"] > 100, (fig_id, img)
    assert shown.absent == []
    assert shown.requests == []
    assert shown.console_errors == []
    assert path.stat().st_size < 3_000_000  # a page people can mail


def test_single_objective_page_has_no_pareto_section(browser: object, tmp_path: Path) -> None:
    shown = render(browser, write_page(page_data(), tmp_path / "report.html"))
    assert sorted(shown.figures) == sorted(set(FIGURES) - {"pareto"})
    assert all(img["natural"] > 0 for img in shown.figures.values())
    assert (shown.requests, shown.console_errors) == ([], [])


def test_sections_without_data_say_why(browser: object, tmp_path: Path) -> None:
    data = page_data(held_out="no export (--no-export)", curves=[], points=[TrialPoint(0, "FAIL", None)],
                     importances="importances need at least two complete trials with varied parameters (0 complete)",
                     best=None)
    shown = render(browser, write_page(data, tmp_path / "report.html"))
    assert shown.figures == {}
    assert len(shown.absent) == 4
    assert any("--no-export" in a for a in shown.absent)
    assert any("two complete trials" in a for a in shown.absent)
    assert (shown.requests, shown.console_errors) == ([], [])


def test_the_checks_catch_a_request_and_a_script_error(browser: object, tmp_path: Path) -> None:
    """Control: the same page with an external image and a failing script fails both checks."""
    path = write_page(page_data(held_out="absent"), tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    text = text.replace("<meta http-equiv='Content-Security-Policy'", "<meta name='x-disabled-csp'")
    text = text.replace("</body>", "<img src='http://127.0.0.1:9/tile.png'><script>undefinedFunction()</script></body>")
    bad = tmp_path / "bad.html"
    bad.write_text(text, encoding="utf-8")
    shown = render(browser, bad)
    assert shown.requests == ["http://127.0.0.1:9/tile.png"]
    assert any("undefinedFunction" in e for e in shown.console_errors)


def test_the_page_blocks_requests_itself(browser: object, tmp_path: Path) -> None:
    """With its Content-Security-Policy, even an injected external image is never fetched (and Chromium says so)."""
    path = write_page(page_data(held_out="absent"), tmp_path / "report.html")
    path.write_text(path.read_text(encoding="utf-8").replace(
        "</body>", "<img src='http://127.0.0.1:9/tile.png'></body>"), encoding="utf-8")
    shown = render(browser, path)
    assert shown.requests == []
    assert any("Content Security Policy" in e for e in shown.console_errors)


def test_the_pareto_section_follows_the_summary() -> None:
    """Two objectives: the front and the exported trial come from summary.json's ``pareto`` entry."""
    summary = {
        "trials": [{"number": 0, "value": 5.0, "metrics": {"val/nll_km": 5.0, "latency_ms": 1.0}},
                   {"number": 1, "value": 4.9, "metrics": {"val/nll_km": 4.9, "latency_ms": 2.0}},
                   {"number": 2, "value": None, "metrics": {}}],
        "pareto": {"objectives": ["val/nll_km", "latency_ms"], "chosen": {"number": 1, "trial_id": "b"},
                   "front": [{"number": 0, "values": {"val/nll_km": 5.0, "latency_ms": 1.0}},
                             {"number": 1, "values": {"val/nll_km": 4.9, "latency_ms": 2.0}}]},
    }
    view = pareto_view(summary)
    assert view == ParetoView(("val/nll_km", "latency_ms"), {0: (5.0, 1.0), 1: (4.9, 2.0)}, [0, 1], 1)
    assert pareto_view({"trials": summary["trials"]}) is None
    assert pareto_view({"pareto": None}) is None


@pytest.mark.ray
def test_a_real_study_writes_its_page_and_logs_it_to_mlflow(
    ray_session: object, browser: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A smoke study (embedded services) exported and registered: the page shows the exported model next to the
    oracle and the centre on its test recordings, every trial's curve, and is an artefact of the study's run."""
    from mlflow import MlflowClient

    from tuning.run import main

    name = "page-study"
    code = main(["--smoke-test", "--recordings", "64", "--dataset", name, "--name", name, "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    path = tmp_path / "studies" / name / "report.html"
    assert f"report:    {path}" in out

    shown = render(browser, path)
    assert {"map", "error-cdf", "calibration", "learning-curves", "history"} <= set(shown.figures), shown
    assert all(img["complete"] and img["natural"] > 0 for img in shown.figures.values()), shown.figures
    assert "pareto" not in shown.figures  # one objective
    # Two smoke trials with random parameters: importances are drawn or their absence is explained.
    assert "importances" in shown.figures or any("importances" in a for a in shown.absent), shown.absent
    assert (shown.requests, shown.console_errors) == ([], [])
    text = path.read_text(encoding="utf-8")
    assert all(f"<td>{m}</td>" in text for m in ("best trial", "oracle", "centre"))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    parents = client.search_runs([experiment.experiment_id], "tags.`heimdall.study_run` = 'true'")
    assert len(parents) == 1
    assert "report.html" in [f.path for f in client.list_artifacts(parents[0].info.run_id)]


def test_without_an_export_the_held_out_sections_say_why(tmp_path: Path) -> None:
    assert "--no-export" in held_out_or_why({"trials": []})
    refused = held_out_or_why({"export": {"status": "refused", "error": "parity gate failed: 3 outputs differ"}})
    assert refused == "the export was refused: parity gate failed: 3 outputs differ"
    missing = held_out_or_why({"export": {"status": "pending", "export_dir": str(tmp_path)}})
    assert "heldout.npz" in missing and str(tmp_path) in missing
