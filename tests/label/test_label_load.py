"""The MONAI Label server under a bounded burst of infer requests (Reliability item 6).

50 ``anatomy_vlp_findings`` requests, at most 8 in flight, sent by ``scripts/label_load.py`` to the server
of ``label_server`` (conftest.py: the tiny model on 127.0.0.1, 40 x 32 x 32 CT images). Two different
images are uploaded in turn, so a result handed to the wrong request would show. Every answer must be
HTTP 200 with the result of a sequential request for the same image, which must be the
``Predictor``'s result on that file. The latency percentiles are printed. The script's command line is
checked on a few requests.
"""

import pytest

pytest.importorskip("monailabel")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from typing import Any  # noqa: E402

from anatomy_vlp_bundle.inference import Predictor  # noqa: E402

REQUESTS = 50
CONCURRENCY = 8


def assert_close(got: Any, expected: Any, where: str = "result") -> None:
    """Equal structure and values; floats within 1e-5 (the server and this process may sum in other orders)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), (where, got, expected)
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (where, got, expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


@pytest.mark.timeout(300)
def test_burst_of_infer_requests_is_answered_correctly(label_server, label_data, label_load, tmp_path, capsys):
    images = []
    for image_id in (label_data["unlabelled"], label_data["labelled"][0]):
        images.append(str(tmp_path / f"{image_id}.nii.gz"))
        shutil.copy(label_data["studies"] / f"{image_id}.nii.gz", images[-1])

    report = label_load.run_load(label_server.url, "anatomy_vlp_findings", images, requests=REQUESTS,
                                 concurrency=CONCURRENCY, timeout=120)
    with capsys.disabled():
        print(f"\nMONAI Label load ({REQUESTS} requests, {CONCURRENCY} in flight, 40x32x32 CT uploads):\n"
              + label_load.format_report(report))

    summary = report.summary()
    assert summary["requests"] == REQUESTS and 1 < summary["peak_in_flight"] <= CONCURRENCY
    assert not report.errors(), label_load.format_report(report)
    # the references: the Predictor's results on the same files (but for the server's temporary file name)
    predictor = Predictor.load(label_data["ckpt"])
    for image in images:
        expected = {k: v for k, v in predictor.predict(image).result.items() if k not in label_load.VOLATILE_FIELDS}
        assert_close(report.references[image], expected)
    assert report.references[images[0]]["anatomies"] != report.references[images[1]]["anatomies"]
    # ... and every answer of the burst is its image's reference
    assert not report.mismatches(), label_load.format_report(report)
    assert label_server.process.poll() is None, label_server.log_tail()


def test_script_prints_the_percentiles_and_fails_on_errors(label_server, label_data, label_load, tmp_path, capsys):
    """The command line: datastore ids (no upload), the report as JSON, exit status 1 when a request fails."""
    out = tmp_path / "load.json"
    argv = ["--url", label_server.url, "--image", label_data["unlabelled"], "--requests", "4", "--concurrency", "2"]
    assert label_load.main(argv + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"latency s: p50 \d+\.\d{3}  p90 \d+\.\d{3}  p99 \d+\.\d{3}  max \d+\.\d{3}", printed), printed
    assert re.search(r"throughput: \d+\.\d+ requests/s", printed) and "4 ok, 0 errors" in printed, printed
    report = json.loads(out.read_text())
    assert report["summary"]["requests"] == 4 and [r["status"] for r in report["requests"]] == [200] * 4
    assert report["summary"]["p50"] <= report["summary"]["p90"] <= report["summary"]["p99"] <= report["summary"]["max"]
    # an unknown image: every request answers 404, counted as errors, exit status 1
    assert label_load.main(["--url", label_server.url, "--image", "no_such_image", "--requests", "2", "--concurrency", "2"]) == 1
    assert "0 ok, 2 errors" in capsys.readouterr().out
