"""deploy/: each piece checked with the real tool (kubernetes-validate's schemas, promtool,
docker-compose) and against the real proxy (its /metrics, its config loader, its rules
watcher facing a Kubernetes ConfigMap update)."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from proxy import app as app_mod
from proxy import config as config_mod
from proxy import metrics
from proxy.rules import check_rules
from tests.conftest import ProxyFactory
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in YAML(typ="safe", pure=True).load_all(path.read_text()) if d is not None]


def _tool(name: str) -> str:
    """The path of a required command-line tool. Missing: a skip on a workstation, a
    failure in CI (CI=true), so CI can never pass without running the check."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} is required in CI (Debian: apt-get install "
                        f"{'prometheus' if name == 'promtool' else name})")
        pytest.skip(f"{name} not installed")
    return found


def test_a_missing_tool_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-x is required in CI"):
        _tool("no-such-tool-x")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-x not installed"):
        _tool("no-such-tool-x")


# ------------------------------------------------------------------ Kubernetes


def _manifests() -> dict[str, Any]:
    """kind/name -> resource, from every manifest kustomization.yaml lists."""
    kust = _yaml_docs(K8S / "kustomization.yaml")[0]
    out = {}
    for rel in kust["resources"]:
        for doc in _yaml_docs(K8S / rel):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_kustomization_lists_every_manifest() -> None:
    kust = _yaml_docs(K8S / "kustomization.yaml")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(files)


@pytest.mark.parametrize("version", ["1.28.0", kubernetes_validate.latest_version()])
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    resources = _manifests()
    assert sorted(resources) == ["ConfigMap/meterproxy-config", "ConfigMap/meterproxy-rules",
                                 "Deployment/my-api", "NetworkPolicy/my-api-meterproxy",
                                 "PersistentVolumeClaim/meterproxy-data",
                                 "Secret/meterproxy-secrets", "Service/my-api"]
    for name, doc in resources.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")
    # the validator is strict: a misspelt field is refused
    bad = copy.deepcopy(resources["Deployment/my-api"])
    bad["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def _containers() -> dict[str, Any]:
    dep = _manifests()["Deployment/my-api"]
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def _port(container: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def _sidecar_config(tmp_path: Path) -> config_mod.Config:
    """The ConfigMap's meterproxy.yaml, loaded by the real loader with the Secret's env."""
    text = _manifests()["ConfigMap/meterproxy-config"]["data"]["meterproxy.yaml"]
    (tmp_path / "meterproxy.yaml").write_text(text)
    env = {e["name"]: "x" * 16 for e in _containers()["meterproxy"]["env"]}
    return config_mod.load(tmp_path / "meterproxy.yaml", env=env)


def test_the_service_reaches_only_the_proxy_port(tmp_path: Path) -> None:
    c = _containers()
    svc = _manifests()["Service/my-api"]
    cfg = _sidecar_config(tmp_path)
    proxy = c["meterproxy"]
    assert config_mod.split_hostport(cfg.listen)[1] == _port(proxy, "proxy") == 8080
    assert config_mod.split_hostport(cfg.admin_listen)[1] == _port(proxy, "admin") == 9090
    assert cfg.upstream.url == f"http://127.0.0.1:{_port(c['api'], 'api')}"
    assert svc["spec"]["selector"] == _manifests()["Deployment/my-api"]["spec"]["selector"][
        "matchLabels"]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["proxy"]


def test_probes_secrets_resources_and_volumes(tmp_path: Path) -> None:
    dep = _manifests()["Deployment/my-api"]
    pod = dep["spec"]["template"]["spec"]
    proxy = _containers()["meterproxy"]
    cfg = _sidecar_config(tmp_path)
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # every secret the config expands comes from the Secret, under a key it has
    secret = _manifests()["Secret/meterproxy-secrets"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in proxy["env"] if "valueFrom" in e}
    assert sorted(refs) == ["METERPROXY_ADMIN_TOKEN", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET"]
    for ref in refs.values():
        assert ref["name"] == "meterproxy-secrets" and ref["key"] in secret["stringData"]
    for c in pod["containers"]:
        assert set(c["resources"]["requests"]) == {"cpu", "memory"}, c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]
    # volumes: the ledger on the PVC, the rules ConfigMap as a directory where rules point
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "meterproxy-data"
    assert "PersistentVolumeClaim/meterproxy-data" in _manifests()
    assert cfg.db_path().parent == Path(mounts["data"]["mountPath"])
    assert volumes["rules"]["configMap"]["name"] == "meterproxy-rules"
    assert "subPath" not in mounts["rules"]
    assert [str(p) for p in cfg.rules] == [mounts["rules"]["mountPath"]]
    assert volumes["config"]["configMap"]["name"] == "meterproxy-config"
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["METERPROXY_CONFIG"] == mounts["config"]["mountPath"] + "/meterproxy.yaml"
    # one writer of the SQLite file: never two pods at once
    assert (dep["spec"]["replicas"], dep["spec"]["strategy"]["type"]) == (1, "Recreate")


def _drain_budget() -> float:
    """Worst-case seconds from SIGTERM to exit, from the code's own timeouts."""
    src = inspect.getsource(app_mod._start)     # start() wraps _start() (cleanup on failure)
    in_flight = float(re.search(r"shutdown_timeout=([\d.]+)", src).group(1))  # type: ignore[union-attr]
    step = inspect.signature(app_mod.Server.shutdown).parameters["timeout"].default
    final = inspect.signature(app_mod._final_flush).parameters["timeout"].default
    return float(in_flight + step + step + final)   # requests, store drain, flusher, final flush


def test_termination_grace_lets_the_drain_and_final_flush_finish() -> None:
    pod = _manifests()["Deployment/my-api"]["spec"]["template"]["spec"]
    c = _containers()

    def pre_stop(name: str) -> float:
        cmd = c[name]["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[0] == "sleep"
        return float(cmd[1])

    budget = _drain_budget()
    assert budget == 60.0
    assert pod["terminationGracePeriodSeconds"] >= pre_stop("meterproxy") + budget
    # the API stays up while meterproxy still forwards in-flight requests
    in_flight = float(re.search(r"shutdown_timeout=([\d.]+)",  # type: ignore[union-attr]
                                inspect.getsource(app_mod._start)).group(1))
    assert pre_stop("api") >= pre_stop("meterproxy") + in_flight


def test_the_rules_configmap_holds_valid_rules(tmp_path: Path) -> None:
    schema = json.loads((ROOT / "docs" / "schema" / "rules.schema.json").read_text())
    from jsonschema import Draft202012Validator

    data = _manifests()["ConfigMap/meterproxy-rules"]["data"]
    assert data
    for key, text in data.items():
        assert key.endswith(".yaml"), key      # the rules directory loads *.yaml only
        f = tmp_path / key
        f.write_text(text)
        assert check_rules([f]) == [], key
        assert list(Draft202012Validator(schema).iter_errors(
            YAML(typ="safe", pure=True).load(text))) == [], key


def _kubelet_write(mount: Path, files: dict[str, str], stamp: str,
                   keep_mtime_of: Path | None = None) -> None:
    """What the kubelet's AtomicWriter does on a ConfigMap update: write the files into a
    new hidden directory, swap the ``..data`` symlink to it atomically, keep per-key
    symlinks ``name -> ..data/name``, remove the old directory."""
    new = mount / f"..{stamp}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
        if keep_mtime_of is not None:           # worst case: same size and same mtime
            st = keep_mtime_of.stat()
            os.utime(new / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    (mount / "..data_tmp").symlink_to(new.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(mount / old)


RULES_V1 = """\
version: 1
meters:
  api_calls: {stripe_event_name: api_calls}
rules:
  - name: everything
    match: {path: "/**"}
    usage: [{meter: api_calls, quantity: 1}]
"""


async def test_a_configmap_update_is_picked_up_by_the_rules_watcher(
        tmp_path: Path, make_proxy: ProxyFactory) -> None:
    mount = tmp_path / "rules-mount"
    mount.mkdir()
    _kubelet_write(mount, {"rules.yaml": RULES_V1}, "2026_01_01_00_00_00.1")
    p = await make_proxy(rules=str(mount))
    before = (await p.admin("GET", "/readyz"))["rules_version"]
    # same length, different price: a change the size alone would not reveal
    v2 = RULES_V1.replace("quantity: 1}", "quantity: 2}")
    assert len(v2) == len(RULES_V1)
    _kubelet_write(mount, {"rules.yaml": v2}, "2026_01_01_00_01_00.2",
                   keep_mtime_of=mount / "rules.yaml")
    async def version() -> str:
        return str((await p.admin("GET", "/readyz"))["rules_version"])
    await wait_until(version, ok=lambda after: after != before, timeout=15, interval=0.1,
                     what="the rules watcher to see the ConfigMap symlink swap")
    key = await p.customer_with_key("acme")
    async with p.session.get(p.url + "/v1/items",
                             headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert p.ledger_totals() == {("acme", "api_calls"): 2_000_000}


# ------------------------------------------------------------------ Prometheus and Grafana


def _alert_rules() -> list[dict[str, Any]]:
    doc = _yaml_docs(DEPLOY / "prometheus" / "alerts.yaml")[0]
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "meterproxy-dashboard.json").read_text()))


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in _dashboard()["templating"]["list"] if "definition" in v]
    return exprs


def _as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL (its variables replaced by what they expand to)."""
    if expr.startswith("label_values("):
        return expr.removeprefix("label_values(").rsplit(",", 1)[0]
    return expr.replace("$__rate_interval", "5m").replace('"$job"', '".+"')


def test_alert_rules_pass_promtool() -> None:
    promtool = _tool("promtool")
    out = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout
    assert sorted(r["alert"] for r in _alert_rules()) == [
        "MeterproxyCreditBalanceMismatch", "MeterproxyCreditGrantMirrorsDead",
        "MeterproxyDeadLetters", "MeterproxyDown", "MeterproxyOutboxLag",
        "MeterproxyReconcileDrift", "MeterproxyRulesReloadFailing", "MeterproxyStorageDown",
        "MeterproxyTrueUpUnsent"]
    cfg = subprocess.run([promtool, "check", "config",
                          str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    exprs = [_as_promql(e) for e in _dashboard_exprs()]
    assert len(exprs) >= 20

    def check(items: list[str]) -> subprocess.CompletedProcess[str]:
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(items)]}]}
        f = tmp_path / "dashboard-rules.yaml"
        f.write_text(json.dumps(rules))
        return subprocess.run([promtool, "check", "rules", str(f)], capture_output=True,
                              text=True, timeout=60, check=False)

    ok = check(exprs)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert check(["sum by (rule (rate(meterproxy_requests_total[5m]))"]).returncode != 0


def test_dashboard_is_wired_to_the_provisioned_datasource() -> None:
    dash = _dashboard()
    ds = _yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]
    uid = ds["datasources"][0]["uid"]
    var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == uid
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Requests by rule and status", "Added latency (proxy overhead)",
                   "Commit latency", "Outbox lag", "Flush outcomes", "Dead letters",
                   "Credit refusals (402)", "Reconciliation drift"):
        assert needed in titles


def _metric_objects() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Family name -> (type, label names), from proxy/metrics.py's objects."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, (Counter, Gauge, Histogram)):
            out[obj._name] = (obj._type, tuple(obj._labelnames))
        elif isinstance(obj, metrics.LoopHistogram):
            out[obj.name] = ("histogram", ())
        elif isinstance(obj, metrics.LoopCounter):
            out[obj.name] = ("counter", obj.labelnames)
    return out


_BUILTIN = {"up"}                      # Prometheus' own series


def _names_in(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(meterproxy_[a-z0-9_]+|up)\b", expr)}


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy()
    key = await p.customer_with_key("acme")
    async with p.session.get(p.url + "/v1/items", headers={"X-API-Key": key}) as r:
        assert r.status == 200
    await p.admin("POST", "/admin/flush", expect=200)
    async with p.session.get(p.admin_url + "/metrics", headers=p.admin_headers) as r:
        assert r.status == 200
        exposition = await r.text()
    samples: set[str] = set()
    families: dict[str, str] = {}
    for fam in text_string_to_metric_families(exposition):
        families[fam.name] = fam.type
        samples |= {s.name for s in fam.samples}
    # names a query may use: every sample name, plus the sample names of families with no
    # sample yet (a labelled counter before its first increment exposes only HELP/TYPE)
    usable = set(samples)
    for name, kind in families.items():
        usable |= {"counter": {name + "_total"}, "gauge": {name},
                   "histogram": {name + "_bucket", name + "_sum", name + "_count"}}.get(kind, set())
    declared = _metric_objects()
    exprs = _dashboard_exprs() + [r["expr"] for r in _alert_rules()]
    used: set[str] = set()
    for expr in exprs:
        names = _names_in(expr) - _BUILTIN
        assert names or "up{" in expr, expr
        used |= names
        missing = names - usable
        assert not missing, f"{sorted(missing)} used in {expr!r} but not in /metrics"
        # every label the query names exists on a metric it reads
        labels = set(re.findall(r"(\w+)\s*=~?\s*\"", expr)) | {
            x.strip() for grp in re.findall(r"by \(([^)]*)\)", expr) for x in grp.split(",")}
        known = {"job", "instance", "le"}
        for n in names:
            base = re.sub(r"_(total|bucket|sum|count)$", "", n)
            known |= set(declared.get(base, declared.get(n, ("", ())))[1])
        assert labels <= known, (expr, labels - known)
    # the kit covers what the issue asks for
    for must in ("meterproxy_requests_total", "meterproxy_overhead_seconds_bucket",
                 "meterproxy_storage_commit_seconds_bucket", "meterproxy_flush_lag_seconds",
                 "meterproxy_stripe_requests_total", "meterproxy_dead_letters",
                 "meterproxy_credit_rejections_total", "meterproxy_reconcile_discrepancy_rate",
                 "meterproxy_rules_reload_failing", "meterproxy_storage_commits_total"):
        assert must in used, must
    assert "meterproxy_requests_total" in samples       # real traffic was counted


async def test_rules_reload_failing_gauge_follows_the_files(
        tmp_path: Path, make_proxy: ProxyFactory) -> None:
    p = await make_proxy()

    async def gauge() -> float:
        async with p.session.get(p.admin_url + "/metrics", headers=p.admin_headers) as r:
            text = await r.text()
        m = re.search(r"^meterproxy_rules_reload_failing (\S+)$", text, re.M)
        assert m is not None
        return float(m.group(1))

    rules = tmp_path / "rules.yaml"
    good = rules.read_text()
    assert await gauge() == 0.0
    rules.write_text(good + "\nbogus: 1\n")
    assert await app_mod.reload_rules(p.server.rt) is False
    assert await gauge() == 1.0
    rules.write_text(good)
    assert await app_mod.reload_rules(p.server.rt) is True
    assert await gauge() == 0.0


# ------------------------------------------------------------------ docker compose


def _compose() -> dict[str, Any]:
    return dict(_yaml_docs(DEPLOY / "compose.yaml")[0])


def test_compose_file_passes_docker_compose_config() -> None:
    tool = _tool("docker-compose")
    out = subprocess.run([tool, "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60, check=False, cwd=DEPLOY)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = DEPLOY / ".compose-broken.yaml"
    try:
        broken.write_text((DEPLOY / "compose.yaml").read_text().replace(
            "    ports:\n      - \"8080:8080\"", "    portz:\n      - \"8080:8080\""))
        bad = subprocess.run([tool, "-f", str(broken), "config", "--quiet"],
                             capture_output=True, text=True, timeout=60, check=False, cwd=DEPLOY)
        assert bad.returncode != 0 and "portz" in bad.stdout + bad.stderr
    finally:
        broken.unlink()


def test_compose_references_files_that_exist_and_agree(tmp_path: Path) -> None:
    doc = _compose()
    services = doc["services"]
    assert sorted(services) == ["grafana", "meterproxy", "prometheus", "upstream"]
    for name, svc in services.items():
        assert "image" in svc, name
        if "build" in svc:
            ctx = (DEPLOY / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"].get("dockerfile", "Dockerfile")).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in doc["volumes"], f"{name}: named volume {src} is not declared"
    # meterproxy: the container's config with the compose environment loads, and its rules
    env = services["meterproxy"]["environment"]
    cfg = config_mod.load(DEPLOY / "meterproxy.yaml", env=env)
    rules_mount = next(v for v in services["meterproxy"]["volumes"] if "rules" in v.split(":")[1])
    assert rules_mount.split(":")[1] == env["METERPROXY_RULES"] == cfg.rules[0]
    assert check_rules(sorted((DEPLOY / rules_mount.split(":")[0]).glob("*.yaml"))) == []
    assert cfg.stripe.sink == "dry_run"
    assert cfg.upstream.url == "http://upstream:9000"
    assert "port=9000" in services["upstream"]["command"][0]
    # Prometheus scrapes the admin port with the admin token; Grafana gets the dashboard
    prom = _yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    job = prom["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == [
        f"meterproxy:{config_mod.split_hostport(cfg.admin_listen)[1]}"]
    assert job["authorization"]["credentials"] == env["METERPROXY_ADMIN_TOKEN"] == cfg.admin.token
    graf = services["grafana"]
    dash_mount = next(v for v in graf["volumes"] if v.endswith(".json:ro"))
    provider = _yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "meterproxy.yaml")[0]
    assert Path(dash_mount.split(":")[1]).parent == Path(provider["providers"][0]["options"]["path"])
