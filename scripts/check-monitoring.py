#!/usr/bin/env python3
"""check-monitoring.py: what promtool does not check in deploy/monitoring.

    check-monitoring.py prepare DIR    checks the rules' and the dashboard's
                                       shape, then writes for promtool:
                                       DIR/dashboard-rules.yml, each dashboard
                                       query as a recording rule (for `promtool
                                       check rules` to parse with Prometheus's
                                       own parser), and DIR/tests.yml,
                                       alerts_test.yml with each expected
                                       alert's description filled in
    check-monitoring.py names          the metric names the rules and the
                                       dashboard use, one a line

scripts/check-monitoring.sh runs the first; tests/server/
test_monitoring.py imports this file for `used_metric_names` and checks each
name against real servers' /metrics. The folder is deploy/monitoring beside
this script, or $SDX4_MONITORING_DIR (the negative tests use a broken copy).

PromQL has no parser in Python's standard library or Debian's packages, and
promtool parses but does not list what a query reads (`promtool query`
needs a server). So the metric names are found by a small lexer: string
literals, label matchers, ranges and grouping label lists removed, what is
left that looks like an identifier and is neither a keyword nor followed by
"(" (a function or an aggregation) is a metric name. It is enough for the
queries of this folder, whose validity promtool checks separately.
"""
import json
import os
import re
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.environ.get("SDX4_MONITORING_DIR") or os.path.join(HERE, "..", "deploy", "monitoring")
ALERTS = os.path.join(FOLDER, "alerts.yml")
TESTS = os.path.join(FOLDER, "alerts_test.yml")
DASHBOARD = os.path.join(FOLDER, "dashboard.json")

SEVERITIES = ("warning", "critical")
# Grafana's variables, replaced by values of the right kind before parsing
GRAFANA_VARIABLES = [("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h"),
                     ("${job}", ".*"), ("$job", ".*")]
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr):
    """The metric names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][\w:]*", e):
        if m.group(0).lower() in KEYWORDS or re.match(r"\s*\(", e[m.end():]):
            continue
        names.add(m.group(0))
    return names


def grafana_to_promql(expr):
    for variable, value in GRAFANA_VARIABLES:
        expr = expr.replace(variable, value)
    return expr


def load_rules():
    with open(ALERTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries():
    """(where, expression) of every panel target and query variable."""
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    queries = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            queries.append((f'panel {panel["id"]} "{panel["title"]}" {target["refId"]}', target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC, LABEL): the metric must exist
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
            queries.append((f'variable {var["name"]}', m.group(1) if m else var["definition"]))
    return dash, queries


def used_metric_names():
    """{name: [where it is used]} over the rules and the dashboard, recorded
    series (the rules' own outputs) left out."""
    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    used = {}
    for r in rules:
        for name in metric_names(r["expr"]):
            used.setdefault(name, []).append(r.get("alert") or r.get("record"))
    for where, expr in dashboard_queries()[1]:
        for name in metric_names(grafana_to_promql(expr)):
            used.setdefault(name, []).append(where)
    return {n: w for n, w in used.items() if n not in recorded}


def check():
    """What promtool cannot see: each alert's `for`, severity and
    annotations; the dashboard's datasource variable, panels and ids."""
    problems = []
    for r in load_rules():
        if "alert" not in r:
            continue
        a = r["alert"]
        if not r.get("for"):
            problems.append(f"{a}: no `for:`")
        if r.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{a}: severity is not one of {', '.join(SEVERITIES)}")
        for key in ("summary", "description"):
            if not r.get("annotations", {}).get(key, "").strip():
                problems.append(f"{a}: no {key} annotation")
    dash, queries = dashboard_queries()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource" or \
            variables["datasource"].get("query") != "prometheus":
        problems.append("dashboard: no Prometheus datasource variable `datasource`")
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        problems.append("dashboard: panel ids repeat")
    for v in variables.values():
        if v["type"] == "query" and v.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f'dashboard: variable {v["name"]} does not use the ${{datasource}} variable')
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f'dashboard: panel "{p["title"]}" does not use the ${{datasource}} variable')
        if not p.get("targets"):
            problems.append(f'dashboard: panel "{p["title"]}" has no query')
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f'dashboard: panel "{p["title"]}" {t["refId"]} does not use ${{datasource}}')
    for where, expr in queries:
        if not metric_names(grafana_to_promql(expr)) and "time()" not in expr:
            problems.append(f"dashboard: {where} reads no metric")
    return problems


def dashboard_rules(out):
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_queries()[1])]
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)


def expand_tests(out):
    """alerts_test.yml, its rule file made absolute, each expected alert's
    description (fixed text, unlike the templated summary the test gives)
    copied from alerts.yml: promtool compares annotations whole."""
    descriptions = {r["alert"]: r["annotations"]["description"] for r in load_rules() if "alert" in r}
    with open(TESTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    doc["rule_files"] = [os.path.abspath(os.path.join(FOLDER, p)) for p in doc["rule_files"]]
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                alert.setdefault("exp_annotations", {})["description"] = descriptions[case["alertname"]]
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command == "prepare" and len(argv) == 3:
        problems = check()
        for p in problems:
            print(p)
        if problems:
            return 1
        dashboard_rules(os.path.join(argv[2], "dashboard-rules.yml"))
        expand_tests(os.path.join(argv[2], "tests.yml"))
        return 0
    if command == "names":
        for name, where in sorted(used_metric_names().items()):
            print(name, "\t", ", ".join(sorted(set(where))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
