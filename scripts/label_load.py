"""Load test of a MONAI Label server: a burst of infer requests, a bounded number in flight.

    python scripts/label_load.py --url http://127.0.0.1:8000 --model anatomy_vlp_findings \\
        --image case_0007 --requests 50 --concurrency 8

``--image`` is a datastore image id (sent as ``?image=ID``) or a local image file (uploaded as the
request's ``file``); repeat it to cycle through several images. Each image is first sent once alone (its
reference answer, which also warms the server up), then ``--requests`` requests go out from
``--concurrency`` threads. Every answer must be HTTP 200 with the reference's result (the JSON without
``latencies`` and, for uploads, ``image``, the server's temporary file). Prints the latency percentiles
(p50, p90, p99, max: nearest rank, seconds from sending to the last byte), the throughput (requests
per second of wall time) and the errors; ``--json`` writes the report. Exit status 1 when a request
failed or answered something else than its reference.

Standard library only: runs with any Python 3.9+.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

#: result fields that differ between equal answers: timings, and the server's temporary file of an upload
VOLATILE_FIELDS = ("latencies", "image")


@dataclass
class Answer:
    """One request: which image, HTTP status (0: no answer), seconds to the last byte, the body (or the error)."""

    index: int
    image: str
    status: int
    seconds: float
    body: bytes

    def result(self) -> Optional[Dict[str, Any]]:
        """The JSON answer without :data:`VOLATILE_FIELDS` (None when not a JSON object)."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return {k: v for k, v in value.items() if k not in VOLATILE_FIELDS} if isinstance(value, dict) else None


@dataclass
class LoadReport:
    """The burst's answers, the references they are compared with and the wall time."""

    answers: List[Answer]
    references: Dict[str, Optional[Dict[str, Any]]]
    wall_seconds: float
    concurrency: int
    peak_in_flight: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def latencies(self) -> List[float]:
        return sorted(a.seconds for a in self.answers)

    def errors(self) -> List[Answer]:
        """Answers that are not HTTP 200."""
        return [a for a in self.answers if a.status != 200]

    def mismatches(self) -> List[Answer]:
        """HTTP 200 answers whose result differs from their image's reference."""
        return [a for a in self.answers if a.status == 200 and (a.result() is None or a.result() != self.references.get(a.image))]

    def summary(self) -> Dict[str, Any]:
        """Counts, latency percentiles (s), throughput (requests/s)."""
        lat = self.latencies
        return {
            "requests": len(self.answers),
            "concurrency": self.concurrency,
            "peak_in_flight": self.peak_in_flight,
            "ok": len(self.answers) - len(self.errors()) - len(self.mismatches()),
            "errors": len(self.errors()),
            "mismatches": len(self.mismatches()),
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p99": percentile(lat, 99),
            "max": lat[-1] if lat else float("nan"),
            "mean": sum(lat) / len(lat) if lat else float("nan"),
            "wall_seconds": self.wall_seconds,
            "throughput": len(lat) / self.wall_seconds if self.wall_seconds > 0 else float("nan"),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100] of ascending ``sorted_values`` (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def multipart_body(files: Mapping[str, Tuple[str, bytes]], fields: Optional[Mapping[str, str]] = None) -> Tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type.

    Args:
        files: form field -> ``(file name, content)``; the file name goes into the part header as given
            (only ``"`` is escaped), so tests can send names with any bytes.
        fields: plain form fields (e.g. MONAI Label's ``params`` JSON).
    """
    boundary = uuid.uuid4().hex
    parts: List[bytes] = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n")
    for name, (filename, content) in files.items():
        quoted = filename.replace('"', "%22")
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{quoted}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode("utf-8", "surrogateescape") + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def infer_once(url: str, model: str, image: str, upload: Optional[bytes] = None, timeout: float = 300.0,
               index: int = -1) -> Answer:
    """``POST {url}/infer/{model}?output=json``: ``image`` as a datastore id, or ``upload`` as the ``file``
    (named after ``image``'s file name)."""
    query = {"output": "json"}
    if upload is None:
        query["image"] = image
        body, headers = b"", {}
    else:
        body, ctype = multipart_body({"file": (Path(image).name, upload)})
        headers = {"Content-Type": ctype}
    request = urllib.request.Request(f"{url.rstrip('/')}/infer/{urllib.parse.quote(model)}?{urllib.parse.urlencode(query)}",
                                     data=body, headers=headers, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, content = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, content = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        status, content = 0, f"{type(e).__name__}: {e}".encode()
    return Answer(index, image, status, time.perf_counter() - start, content)


def run_load(url: str, model: str, images: Sequence[str], requests: int = 50, concurrency: int = 8,
             timeout: float = 300.0) -> LoadReport:
    """One reference request per image, then ``requests`` requests cycling through ``images`` with at
    most ``concurrency`` in flight.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        model: the infer task.
        images: datastore image ids, or local files (uploaded).
        requests: requests of the burst.
        concurrency: threads sending them (requests in flight at most).
        timeout: seconds each request may take.
    """
    if not images or requests < 1 or concurrency < 1:
        raise ValueError("run_load needs at least one image, one request and one thread")
    uploads = {im: Path(im).read_bytes() if Path(im).is_file() else None for im in images}
    references: Dict[str, Optional[Dict[str, Any]]] = {}
    notes = []
    for im in uploads:
        first = infer_once(url, model, im, uploads[im], timeout)
        references[im] = first.result() if first.status == 200 else None
        notes.append(f"reference {im}: HTTP {first.status} in {first.seconds:.3f} s"
                     + ("" if first.status == 200 else f": {first.body[:300].decode(errors='replace')}"))
    in_flight = peak = 0
    lock = threading.Lock()

    def send(i: int) -> Answer:
        nonlocal in_flight, peak
        im = images[i % len(images)]
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            return infer_once(url, model, im, uploads[im], timeout, index=i)
        finally:
            with lock:
                in_flight -= 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(send, range(requests)))
    return LoadReport(answers, references, time.perf_counter() - start, concurrency, peak, notes)


def format_report(report: LoadReport) -> str:
    """Human-readable summary: percentiles, throughput, errors (the first five shown)."""
    s = report.summary()
    lines = report.notes + [
        f"{s['requests']} requests, concurrency {s['concurrency']} (peak in flight {s['peak_in_flight']}): "
        f"{s['ok']} ok, {s['errors']} errors, {s['mismatches']} answers differing from the reference",
        f"latency s: p50 {s['p50']:.3f}  p90 {s['p90']:.3f}  p99 {s['p99']:.3f}  max {s['max']:.3f}  mean {s['mean']:.3f}",
        f"throughput: {s['throughput']:.2f} requests/s ({s['wall_seconds']:.2f} s wall)",
    ]
    for a in (report.errors() + report.mismatches())[:5]:
        lines.append(f"  request {a.index} ({a.image}): HTTP {a.status}: {a.body[:300].decode(errors='replace')}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the MONAI Label server")
    parser.add_argument("--model", default="anatomy_vlp_findings", help="the infer task")
    parser.add_argument("--image", action="append", required=True,
                        help="datastore image id or local image file (uploaded); repeat to cycle through several")
    parser.add_argument("--requests", type=int, default=50, help="requests of the burst")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--json", help="write the summary and every request's status and latency here")
    args = parser.parse_args(argv)
    report = run_load(args.url, args.model, args.image, args.requests, args.concurrency, args.timeout)
    print(format_report(report))
    if args.json:
        out = {"summary": report.summary(), "notes": report.notes,
               "requests": [{"index": a.index, "image": a.image, "status": a.status, "seconds": round(a.seconds, 4)}
                            for a in report.answers]}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 1 if report.errors() or report.mismatches() else 0


if __name__ == "__main__":
    sys.exit(main())
