"""deploy/monitoring against real servers (issue 18): every metric name that
alerts.yml and dashboard.json use is exported by sdx4 serve (one process,
with --history), a cluster's API node or `sdx4 worker`, scraped after an
upscale and a refused request (labelled counters have no sample before
their first event). Three kinds of name are not plain samples, and each is
handled by name, never skipped:
  - histograms' _bucket, _sum and _count series: present as samples, and
    their family must be TYPE histogram;
  - the GPU series: with no GPU here (CI) they must be declared (HELP and
    TYPE) with no sample and sdx4_gpu_nvml_up 0; where the driver lists a
    GPU, samples are required (scripts/device-check.sh checks that on a
    GPU: test_server_gpu_metrics and its gpu-metrics-serve step);
  - EXTERNAL: series other exporters provide.
The lexer that finds the names (scripts/check-monitoring.py) is tested here
too, and shown to report a name no server exports."""
import importlib.util
import os
import re
import time

import pytest

from conftest import ROOT, Server, Worker, image_bytes

_spec = importlib.util.spec_from_file_location("check_monitoring",
                                               os.path.join(ROOT, "scripts", "check-monitoring.py"))
check_monitoring = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_monitoring)

# named here so that depending on another exporter is a decision
EXTERNAL = {
    "up": "Prometheus itself: whether the last scrape of a target succeeded",
    "kube_deployment_status_replicas_unavailable": "kube-state-metrics",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def driver_lists_a_gpu():
    d = "/proc/driver/nvidia/gpus"
    return os.path.isdir(d) and bool(os.listdir(d))


def parse(text):
    """({sample name: [values]}, {family: type}) of an exposition text."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][\w:]*", line).group(0)
            samples.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    return samples, types


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory, redis_server):
    """/metrics of sdx4 serve (one process), of a cluster's API node and of
    its worker, each after a request or two."""
    history = tmp_path_factory.mktemp("monitoring") / "history.db"
    single = Server("--history", str(history))
    worker = Worker(redis_server.url)
    node = Server("--redis", redis_server.url, "--workers", "0")
    try:
        r = single.post("/api/v1/upscale", files={"image": ("in.png", image_bytes(), "image/png")},
                        data={"num_inference_steps": "1"})
        assert r.status_code == 200, r.text
        # a refusal: sdx4_rejections_total has a sample per cause once one is refused
        r = single.post("/api/v1/upscale", files={"image": ("in.png", b"not an image", "image/png")})
        assert r.status_code in (400, 415, 422), r.text
        assert node.get("/api/v1/health").status_code == 200
        assert worker.get("/healthz").status_code == 200
        texts = {"serve": single.get("/metrics").text, "API node": node.get("/metrics").text,
                 "worker": worker.get("/metrics").text}
    finally:
        for s in (node, worker, single):
            s.check_clean_exit()
    return {where: parse(text) for where, text in texts.items()}


def unexported(used, scrapes):
    """The names of `used` ({name: [where used]}) that no scrape accounts
    for, each with why."""
    samples = {n for s, _ in scrapes.values() for n in s}
    types = {n: t for _, ts in scrapes.values() for n, t in ts.items()}
    gpu_up = any(v == [1.0] for s, _ in scrapes.values() for n, v in s.items() if n == "sdx4_gpu_nvml_up")
    problems = []
    for name, where in sorted(used.items()):
        if name in EXTERNAL:
            continue
        base = next((name[:-len(x)] for x in HISTOGRAM_SUFFIXES if name.endswith(x)), None)
        if base and types.get(base) == "histogram":
            if name not in samples:
                problems.append(f"{name} (histogram {base}): no sample; used by {where}")
        elif name.startswith("sdx4_gpu_") and name != "sdx4_gpu_nvml_up" and not gpu_up:
            if name not in types:
                problems.append(f"{name}: not declared by any server (a GPU series?); used by {where}")
            elif name in samples:
                problems.append(f"{name}: a sample while sdx4_gpu_nvml_up is 0")
        elif name not in samples:
            problems.append(f"{name}: exported by none of {', '.join(scrapes)}; used by {where}")
    return problems


def test_every_metric_the_kit_uses_is_exported(scrapes):
    used = check_monitoring.used_metric_names()
    assert len(used) > 30  # the lexer found the kit's names
    assert unexported(used, scrapes) == []


def test_a_name_no_server_exports_is_reported(scrapes):
    used = {"sdx4_http_requests_totals": ["a typo"], "sdx4_gpu_fan_speed": ["a GPU series that is not"],
            "sdx4_queue_depth_bucket": ["a gauge's bucket"], "sdx4_queue_depth": ["fine"], "up": ["fine"]}
    problems = unexported(used, scrapes)
    assert [p.split(":")[0] for p in problems] == ["sdx4_gpu_fan_speed", "sdx4_http_requests_totals",
                                                   "sdx4_queue_depth_bucket"], problems


def test_gpu_series_as_the_machine_has_gpus(scrapes):
    gpu = driver_lists_a_gpu()
    for where, (samples, types) in scrapes.items():
        gpu_families = {n for n in types if n.startswith("sdx4_gpu_")}
        assert {"sdx4_gpu_nvml_up", "sdx4_gpu_memory_used_bytes", "sdx4_gpu_memory_total_bytes",
                "sdx4_gpu_utilization_percent", "sdx4_gpu_temperature_celsius", "sdx4_gpu_power_watts",
                "sdx4_gpu_info"} <= gpu_families, where
        assert samples["sdx4_gpu_nvml_up"] == [1.0 if gpu else 0.0], where
        present = {n for n in samples if n.startswith("sdx4_gpu_")} - {"sdx4_gpu_nvml_up"}
        assert present == (gpu_families - {"sdx4_gpu_nvml_up"} if gpu else set()), where


def test_process_metrics(scrapes):
    now = time.time()
    for where, (samples, types) in scrapes.items():
        v = {n: samples[n][0] for n in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                                         "process_virtual_memory_bytes", "process_start_time_seconds",
                                         "process_open_fds", "process_max_fds")}
        assert types["process_cpu_seconds_total"] == "counter", where
        assert now - 600 < v["process_start_time_seconds"] <= now, (where, v)
        assert v["process_cpu_seconds_total"] > 0 and v["process_resident_memory_bytes"] > 1 << 20, (where, v)
        assert v["process_virtual_memory_bytes"] >= v["process_resident_memory_bytes"], (where, v)
        assert 3 <= v["process_open_fds"] <= v["process_max_fds"] or v["process_max_fds"] == -1, (where, v)


def test_metric_name_lexer():
    names = check_monitoring.metric_names
    assert names('sum by (job, le) (rate(a_bucket{route=~"up|x", s!="b_total"}[5m] offset 1h)) '
                 '/ on (job) group_left (x) b:recorded:ratio > bool 1e3 and time() - c') == \
        {"a_bucket", "b:recorded:ratio", "c"}
    assert names('histogram_quantile(0.99, sum without (instance) (rate(d[$x:1m])))') == {"d"}
    assert names('max(e) > 0 unless absent(f{a="g"})') == {"e", "f"}
    grafana = check_monitoring.grafana_to_promql('rate(h{job=~"$job"}[$__rate_interval])')
    assert grafana == 'rate(h{job=~".*"}[5m])' and names(grafana) == {"h"}
