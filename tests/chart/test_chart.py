"""The Helm chart in charts/latchkey: lint, render, Kubernetes schemas, and the rendered
latchkey.toml through the real binary.

Run by scripts/test.sh ("helm chart" step) in the virtual environment .cache/chart, with
LATCHKEY_BIN naming the latchkey binary:

    .cache/chart/bin/python -m unittest discover -s tests/chart -v

Helm itself is PyPI helm-python-sdk: Helm's Go SDK as a shared library inside the wheel, called
through ctypes, so no helm binary is downloaded. Kubernetes schemas come from PyPI
kubernetes-validate, which ships them.
"""

from __future__ import annotations

import base64
import copy
import os
import pathlib
import re
import secrets
import subprocess
import tempfile
import unittest

import helm_python as helm
import kubernetes_validate
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the binary's check still covers the file
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "latchkey"
RELEASE = "lk"
NAMESPACE = "latchkey"
FULLNAME = "lk-latchkey"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest whose schemas
# kubernetes-validate ships.
KUBE_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())

# Kinds that have no schema in kubernetes-validate, which ships only the core Kubernetes API:
# the Prometheus Operator's ServiceMonitor is a CRD. It alone skips schema validation; the
# scenario tests check the fields the chart sets on it.
NO_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def load_values(name: str) -> dict:
    with open(CHART / "ci" / name) as f:
        return yaml.safe_load(f)


SCENARIOS = {
    "default": {},
    "sqlite": load_values("sqlite-values.yaml"),
    "postgres": load_values("postgres-values.yaml"),
}


def render(values: dict) -> list[dict]:
    """Every object the chart renders for these values, hooks included."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = path
                objects.append(doc)
    return objects


def strip(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__template"}


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def secret_data(obj: dict) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return data


def config_text(objects: list[dict]) -> str:
    return secret_data(one(objects, "Secret", f"{FULLNAME}-config"))["latchkey.toml"].decode()


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            specs.append((f'{o["kind"]}/{o["metadata"]["name"]}', o["spec"]["template"]["spec"]))
    return specs


class Lint(unittest.TestCase):
    def test_the_chart_lints_clean_for_every_scenario(self):
        for scenario, values in SCENARIOS.items():
            with self.subTest(scenario=scenario):
                report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
                self.assertEqual(report["errors"], [], report)
                # Severity 1 is informational ("icon is recommended"); 2 and 3 are warnings and errors.
                problems = [m for m in report["messages"] if m["severity"] >= 2]
                self.assertEqual(problems, [], report)


class Documentation(unittest.TestCase):
    # Values whose defaults are whole objects: the README documents each as one row.
    WHOLE = {"rollingUpdate", "podSecurityContext", "securityContext", "livenessProbe", "readinessProbe",
             "startupProbe", "resources"}

    def leaves(self, values: dict, prefix: str = ""):
        for key, value in values.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and value and path not in self.WHOLE:
                yield from self.leaves(value, path)
            else:
                yield path

    def test_every_value_has_a_row_in_the_chart_readme(self):
        with open(CHART / "values.yaml") as f:
            values = yaml.safe_load(f)
        readme = (CHART / "README.md").read_text()
        rows = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
        missing = [path for path in self.leaves(values) if path not in rows]
        self.assertEqual(missing, [], "values without a row in charts/latchkey/README.md")


class Schemas(unittest.TestCase):
    def test_every_rendered_object_validates_against_the_kubernetes_schemas(self):
        extra = {
            # Autoscaling replaces the fixed replica count with a HorizontalPodAutoscaler.
            "postgres+autoscaling": {**SCENARIOS["postgres"], "autoscaling": {"enabled": True}},
        }
        for scenario, values in {**SCENARIOS, **extra}.items():
            objects = render(values)
            self.assertTrue(objects)
            for obj in objects:
                key = (obj["apiVersion"], obj["kind"])
                if key in NO_SCHEMA:
                    continue
                for version in KUBE_VERSIONS:
                    with self.subTest(scenario=scenario, object=f'{obj["kind"]}/{obj["metadata"]["name"]}', kube=version):
                        # strict: no property the schema does not define, so a misplaced key fails.
                        kubernetes_validate.validate(strip(obj), version, strict=True)

    def test_autoscaling_makes_an_hpa_and_leaves_replicas_to_it(self):
        objects = render({**SCENARIOS["postgres"], "autoscaling": {"enabled": True}})
        hpa = one(objects, "HorizontalPodAutoscaler")
        self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], FULLNAME)
        self.assertNotIn("replicas", one(objects, "Deployment")["spec"])
        one(objects, "PodDisruptionBudget")


class Hardening(unittest.TestCase):
    def test_every_pod_runs_non_root_read_only_without_privileges(self):
        for scenario, values in SCENARIOS.items():
            for where, spec in pod_specs(render(values)):
                pod = spec.get("securityContext", {})
                self.assertIs(pod.get("runAsNonRoot"), True, where)
                self.assertEqual(pod.get("seccompProfile"), {"type": "RuntimeDefault"}, where)
                self.assertIs(spec.get("automountServiceAccountToken"), False, where)
                volumes = {v["name"]: v for v in spec["volumes"]}
                for c in spec.get("initContainers", []) + spec["containers"]:
                    with self.subTest(scenario=scenario, pod=where, container=c["name"]):
                        sc = c["securityContext"]
                        self.assertIs(sc["runAsNonRoot"], True)
                        self.assertGreater(sc.get("runAsUser", pod.get("runAsUser", 0)), 0)
                        self.assertIs(sc["readOnlyRootFilesystem"], True)
                        self.assertIs(sc["allowPrivilegeEscalation"], False)
                        self.assertEqual(sc["capabilities"], {"drop": ["ALL"]})
                        self.assertEqual(sc["seccompProfile"], {"type": "RuntimeDefault"})
                        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                        self.assertEqual(len(tmp), 1, "a writable /tmp")
                        self.assertIn("emptyDir", volumes[tmp[0]["name"]])


class SQLite(unittest.TestCase):
    """charts/latchkey/ci/sqlite-values.yaml, and the defaults, which are SQLite too."""

    def test_one_replica_recreated_with_the_ledger_on_a_volume(self):
        for scenario in ("default", "sqlite"):
            with self.subTest(scenario=scenario):
                objects = render(SCENARIOS[scenario])
                dep = one(objects, "Deployment", FULLNAME)
                self.assertEqual(dep["spec"]["replicas"], 1)
                self.assertEqual(dep["spec"]["strategy"], {"type": "Recreate"})
                spec = dep["spec"]["template"]["spec"]
                pvc = one(objects, "PersistentVolumeClaim")
                data = [v for v in spec["volumes"] if v["name"] == "data"]
                self.assertEqual(data[0]["persistentVolumeClaim"]["claimName"], pvc["metadata"]["name"])
                mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
                self.assertEqual(mounts["data"], "/var/lib/latchkey")
                self.assertIn('url = "sqlite:///var/lib/latchkey/latchkey.db"', config_text(objects))
                self.assertEqual(find(objects, "PodDisruptionBudget"), [], "one replica: no budget")
                self.assertEqual(find(objects, "HorizontalPodAutoscaler"), [])
                self.assertEqual(find(objects, "Job"), [])
                init = spec["initContainers"]
                self.assertEqual([c["name"] for c in init], ["migrate"])
                self.assertEqual(init[0]["args"], ["migrate", "--config", "/etc/latchkey/config/latchkey.toml"])

    def test_the_volume_size_and_class_come_from_the_values(self):
        pvc = one(render(SCENARIOS["sqlite"]), "PersistentVolumeClaim")
        self.assertEqual(pvc["spec"]["resources"]["requests"]["storage"], "2Gi")
        self.assertEqual(pvc["spec"]["storageClassName"], "standard")
        self.assertEqual(pvc["metadata"]["annotations"]["helm.sh/resource-policy"], "keep")

    def test_the_chart_refuses_more_than_one_sqlite_replica(self):
        cases = {
            "replicaCount 2": ({**SCENARIOS["sqlite"], "replicaCount": 2}, "replicaCount=2 is refused"),
            "replicaCount 3 on the defaults": ({"replicaCount": 3}, "replicaCount=3 is refused"),
            "autoscaling": ({**SCENARIOS["sqlite"], "autoscaling": {"enabled": True}}, "autoscaling.enabled=true is refused"),
        }
        for case, (values, message) in cases.items():
            with self.subTest(case=case):
                with self.assertRaises(helm.HelmRenderError) as caught:
                    render(values)
                text = str(caught.exception)
                self.assertIn("store.type=sqlite runs exactly one replica", text)
                self.assertIn(message, text)

    def test_tls_and_the_checkpoint_key_come_from_existing_secrets(self):
        objects = render(SCENARIOS["sqlite"])
        spec = one(objects, "Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        self.assertEqual(volumes["tls"]["secret"]["secretName"], "latchkey-tls")
        self.assertEqual(volumes["checkpoint"]["secret"]["secretName"], "latchkey-checkpoint")
        text = config_text(objects)
        self.assertIn('tls_cert_file = "/etc/latchkey/tls/tls.crt"', text)
        self.assertIn('checkpoint_key_file = "/etc/latchkey/audit/checkpoint.key"', text)
        service = one(objects, "Service")
        self.assertEqual(service["spec"]["ports"][0]["appProtocol"], "https")


class PostgreSQL(unittest.TestCase):
    """charts/latchkey/ci/postgres-values.yaml: three replicas on PostgreSQL."""

    @classmethod
    def setUpClass(cls):
        cls.objects = render(SCENARIOS["postgres"])
        cls.dep = one(cls.objects, "Deployment", FULLNAME)
        cls.spec = cls.dep["spec"]["template"]["spec"]

    def test_three_replicas_rolled_one_at_a_time(self):
        self.assertEqual(self.dep["spec"]["replicas"], 3)
        self.assertEqual(
            self.dep["spec"]["strategy"],
            {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        )
        self.assertEqual(find(self.objects, "PersistentVolumeClaim"), [])
        self.assertNotIn("initContainers", self.spec)
        pdb = one(self.objects, "PodDisruptionBudget")
        self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        self.assertEqual(pdb["spec"]["selector"], self.dep["spec"]["selector"])

    def test_the_store_url_comes_from_the_secret_and_not_from_the_config(self):
        env = {e["name"]: e for e in self.spec["containers"][0]["env"]}
        self.assertEqual(
            env["LATCHKEY_STORE_URL"]["valueFrom"]["secretKeyRef"], {"name": "latchkey-store", "key": "url"}
        )
        text = config_text(self.objects)
        self.assertNotIn("[store]", text.replace("# [store]", ""))
        self.assertNotIn("postgres://", text)

    def test_the_migration_job_is_a_pre_install_and_pre_upgrade_hook(self):
        job = one(self.objects, "Job")
        annotations = job["metadata"]["annotations"]
        self.assertEqual(annotations["helm.sh/hook"], "pre-install,pre-upgrade")
        self.assertEqual(annotations["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded")
        pod = job["spec"]["template"]["spec"]
        self.assertEqual(pod["restartPolicy"], "Never")
        container = pod["containers"][0]
        self.assertEqual(container["args"][:2], ["migrate", "--config"])
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(env["LATCHKEY_STORE_URL"]["valueFrom"]["secretKeyRef"]["name"], "latchkey-store")
        # Its config Secret is a hook too, created before the Job (a lower weight): hooks run
        # before the release's own objects exist.
        config_name = [v for v in pod["volumes"] if v["name"] == "config"][0]["secret"]["secretName"]
        hook_secret = one(self.objects, "Secret", config_name)
        self.assertEqual(hook_secret["metadata"]["annotations"]["helm.sh/hook"], "pre-install,pre-upgrade")
        self.assertLess(
            int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]), int(annotations["helm.sh/hook-weight"])
        )
        # Its pods are not the broker's: the Service and the budget must not select them.
        labels = job["spec"]["template"]["metadata"]["labels"]
        selector = self.dep["spec"]["selector"]["matchLabels"]
        self.assertFalse(all(labels.get(k) == v for k, v in selector.items()))

    def test_a_chart_made_store_secret_reaches_the_hook_too(self):
        values = copy.deepcopy(SCENARIOS["postgres"])
        values["store"]["postgres"] = {"url": "postgres://latchkey:pw@db:5432/latchkey"}
        objects = render(values)
        self.assertEqual(secret_data(one(objects, "Secret", f"{FULLNAME}-store"))["url"], b"postgres://latchkey:pw@db:5432/latchkey")
        job = one(objects, "Job")
        ref = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}["LATCHKEY_STORE_URL"]
        hook_secret = one(objects, "Secret", ref["valueFrom"]["secretKeyRef"]["name"])
        self.assertIn("helm.sh/hook", hook_secret["metadata"]["annotations"])
        self.assertEqual(secret_data(hook_secret)["url"], b"postgres://latchkey:pw@db:5432/latchkey")

    def test_postgres_without_a_store_url_is_refused(self):
        with self.assertRaises(helm.HelmRenderError) as caught:
            render({"store": {"type": "postgres"}})
        self.assertIn("store.postgres.existingSecret or store.postgres.url", str(caught.exception))

    def test_the_service_account_carries_the_cloud_identity(self):
        sa = one(self.objects, "ServiceAccount", FULLNAME)
        self.assertEqual(
            sa["metadata"]["annotations"], {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/latchkey-broker"}
        )
        self.assertEqual(self.spec["serviceAccountName"], FULLNAME)

    def test_monitoring_and_network_policy(self):
        sm = one(self.objects, "ServiceMonitor")
        self.assertEqual(sm["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(sm["spec"]["endpoints"][0]["port"], "metrics")
        self.assertEqual(sm["spec"]["endpoints"][0]["path"], "/metrics")
        self.assertEqual(sm["spec"]["selector"]["matchLabels"], one(self.objects, "Service")["spec"]["selector"])
        self.assertEqual(sm["metadata"]["labels"]["release"], "prometheus")
        netpol = one(self.objects, "NetworkPolicy")
        self.assertEqual(netpol["spec"]["policyTypes"], ["Ingress", "Egress"])
        self.assertEqual(
            [r["ports"][0]["port"] for r in netpol["spec"]["ingress"]], ["api", "metrics"]
        )
        self.assertIn({"port": 53, "protocol": "UDP"}, netpol["spec"]["egress"][0]["ports"])

    def test_backend_secrets_are_mounted_where_the_config_reads_them(self):
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        sources = volumes["github"]["projected"]["sources"]
        self.assertEqual(
            [(s["secret"]["name"], s["secret"]["items"][0]["path"]) for s in sources],
            [("latchkey-github-app", "default.pem"), ("latchkey-github-ghes", "ghes.pem")],
        )
        self.assertEqual(volumes["vault"]["secret"]["secretName"], "latchkey-vault")
        text = config_text(self.objects)
        self.assertIn('private_key_file = "/etc/latchkey/github/default.pem"', text)
        self.assertIn('secret_id_file = "/etc/latchkey/vault/secret-id"', text)
        self.assertIn('previous_key_files = ["/etc/latchkey/sealing/previous/2025-q4.key"]', text)


class Everywhere(unittest.TestCase):
    """What every scenario shares: probes, policies, the one sealing key."""

    def test_probes_are_on_healthz_and_readyz(self):
        for scenario, values in SCENARIOS.items():
            with self.subTest(scenario=scenario):
                container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
                self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
                self.assertEqual(ports["metrics"], 9090)
                # The probes' port is the listener that serves them: admin_listen.
                self.assertIn('admin_listen = "0.0.0.0:9090"', config_text(render(values)))

    def test_policies_from_the_values_are_in_the_configmap_and_mounted_as_the_policy_dir(self):
        for scenario, values in SCENARIOS.items():
            with self.subTest(scenario=scenario):
                objects = render(values)
                cm = one(objects, "ConfigMap", f"{FULLNAME}-policies")
                self.assertEqual(cm.get("data") or {}, values.get("policies", {}))
                spec = one(objects, "Deployment")["spec"]["template"]["spec"]
                volume = [v for v in spec["volumes"] if v["name"] == "policies"][0]
                self.assertEqual(volume["configMap"]["name"], cm["metadata"]["name"])
                mount = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "policies"][0]
                self.assertIn(f'dir = "{mount["mountPath"]}"', config_text(objects))

    def test_every_replica_mounts_the_one_sealing_key(self):
        for scenario, values in SCENARIOS.items():
            with self.subTest(scenario=scenario):
                objects = render(values)
                dep = one(objects, "Deployment")
                spec = dep["spec"]["template"]["spec"]
                # Replicas are copies of one pod template: one Secret, mounted into the server.
                sealing = [v for v in spec["volumes"] if v["name"] == "sealing"]
                self.assertEqual(len(sealing), 1)
                name = sealing[0]["secret"]["secretName"]
                expected = values.get("sealing", {}).get("existingSecret") or f"{FULLNAME}-sealing"
                self.assertEqual(name, expected)
                mount = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "sealing"][0]
                item = [i for i in sealing[0]["secret"]["items"] if i["path"] == "latchkey.key"][0]
                self.assertIn(f'key_file = "{mount["mountPath"]}/{item["path"]}"', config_text(objects))
                if name == f"{FULLNAME}-sealing":
                    secret = one(objects, "Secret", name)
                    # Made once and kept: losing it makes every sealed handle unreadable.
                    self.assertEqual(secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep")
                    self.assertEqual(len(base64.b64decode(secret_data(secret)["latchkey.key"])), 32)

    def test_the_rendered_config_is_toml_with_the_chart_paths(self):
        if tomllib is None:
            self.skipTest("tomllib needs Python 3.11")
        for scenario, values in SCENARIOS.items():
            with self.subTest(scenario=scenario):
                config = tomllib.loads(config_text(render(values)))
                self.assertEqual(config["sealing"]["key_file"], "/etc/latchkey/sealing/latchkey.key")
                self.assertEqual(len(config.get("issuer", [])), len(values.get("config", {}).get("issuers", [])))
                self.assertEqual(len(config.get("admin_key", [])), len(values.get("config", {}).get("adminKeys", [])))


# Contents of the Secrets each scenario names as existing (an operator would have made them).
# Only the sealing keys are read by `serve --check`; the rest must merely exist.
def existing_secrets() -> dict[str, dict[str, bytes]]:
    key = lambda: base64.b64encode(secrets.token_bytes(32)) + b"\n"
    pem = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    return {
        "latchkey-tls": {"tls.crt": b"-----BEGIN CERTIFICATE-----\n", "tls.key": pem},
        "latchkey-checkpoint": {"checkpoint.key": pem},
        "latchkey-store": {"url": b"postgres://latchkey:pw@db.latchkey.invalid:5432/latchkey"},
        "latchkey-sealing": {"current.key": key(), "previous.key": key()},
        "latchkey-github-app": {"private-key.pem": pem},
        "latchkey-github-ghes": {"private-key.pem": pem},
        "latchkey-vault": {"secret-id": b"secret-id\n", "ca.crt": b"-----BEGIN CERTIFICATE-----\n"},
    }


class Pod:
    """A pod's files and environment, laid out under a scratch root from the rendered objects:
    every volume the container mounts, filled from the chart's Secrets and ConfigMaps or from
    the existing ones above. Paths in latchkey.toml and in the arguments are moved under the root
    by their mount points, so a path that no mount provides stays unresolved and fails."""

    def __init__(self, objects: list[dict], spec: dict, container: dict, root: pathlib.Path):
        self.objects, self.root = objects, root
        self.sources = existing_secrets()
        self.mounts = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len, reverse=True)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in container["volumeMounts"]:
            self._fill(volumes[mount["name"]], root / mount["mountPath"].lstrip("/"))
        self.env = {}
        for e in container.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                self.env[e["name"]] = self._data("Secret", ref["name"])[ref["key"]].decode()
        self.args = [self.move(a) for a in container["args"]]
        config = pathlib.Path(self.args[self.args.index("--config") + 1])
        config.write_text(self.move(config.read_text()))

    def move(self, text: str) -> str:
        # One pass, longest mount first, so that a moved path is not moved again.
        pattern = "(" + "|".join(map(re.escape, self.mounts)) + ')(?=/|"|$)'
        return re.sub(pattern, lambda m: f"{self.root}{m.group(1)}", text)

    def _data(self, kind: str, name: str) -> dict[str, bytes]:
        made = find(self.objects, kind, name)
        if made:
            obj = made[0]
            if kind == "ConfigMap":
                return {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            return secret_data(obj)
        if kind == "Secret" and name in self.sources:
            return self.sources[name]
        raise AssertionError(f"the pod needs {kind} {name}, which neither the chart nor the test provides")

    def _write(self, dest: pathlib.Path, data: dict[str, bytes], items: list[dict] | None):
        for key, path in ((i["key"], i["path"]) for i in items) if items else ((k, k) for k in data):
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key])

    def _fill(self, volume: dict, dest: pathlib.Path):
        dest.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            self._write(dest, self._data("Secret", volume["secret"]["secretName"]), volume["secret"].get("items"))
        elif "configMap" in volume:
            self._write(dest, self._data("ConfigMap", volume["configMap"]["name"]), volume["configMap"].get("items"))
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                kind, ref = ("Secret", source["secret"]) if "secret" in source else ("ConfigMap", source["configMap"])
                self._write(dest, self._data(kind, ref["name"]), ref.get("items"))
        elif not ("emptyDir" in volume or "persistentVolumeClaim" in volume):
            raise AssertionError(f"unexpected volume {volume}")

    def run(self, binary: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), **self.env, **(env or {})}
        return subprocess.run(
            [binary, *self.args, *extra], env=clean, cwd=self.root, capture_output=True, text=True, timeout=120
        )


class RealBinary(unittest.TestCase):
    """The rendered latchkey.toml through the latchkey binary's own loader, with every file laid
    out as the pod mounts it: `serve --check` validates the config (unknown keys are errors),
    the sealing key, the TLS files and the policies, and exits."""

    @classmethod
    def setUpClass(cls):
        cls.binary = os.environ.get("LATCHKEY_BIN", "")
        if not cls.binary or not os.access(cls.binary, os.X_OK):
            message = f"no latchkey binary (LATCHKEY_BIN={cls.binary!r})"
            if os.environ.get("LATCHKEY_REQUIRE_PEERS") == "1":
                raise AssertionError(message + " with LATCHKEY_REQUIRE_PEERS=1")
            raise unittest.SkipTest(message)

    def pod(self, objects: list[dict], kind: str, container: str, init: bool = False) -> Pod:
        spec = one(objects, kind)["spec"]["template"]["spec"]
        c = [c for c in spec.get("initContainers" if init else "containers", []) if c["name"] == container][0]
        root = pathlib.Path(tempfile.mkdtemp(prefix="latchkey-chart-"))
        self.addCleanup(subprocess.run, ["rm", "-rf", str(root)])
        return Pod(objects, spec, c, root)

    def test_serve_check_accepts_the_rendered_config(self):
        for scenario, values in SCENARIOS.items():
            with self.subTest(scenario=scenario):
                pod = self.pod(render(values), "Deployment", "latchkey")
                self.assertEqual(pod.args[0], "serve")
                result = pod.run(self.binary, "--check")
                self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
                issuers = len(values.get("config", {}).get("issuers", []))
                policies = len(values.get("policies", {}))
                self.assertIn(f"configuration OK: {issuers} issuer(s), {policies} policy file(s)", result.stdout)

    def test_the_sqlite_init_container_migrates_the_ledger_on_the_volume(self):
        for scenario in ("default", "sqlite"):
            with self.subTest(scenario=scenario):
                pod = self.pod(render(SCENARIOS[scenario]), "Deployment", "migrate", init=True)
                result = pod.run(self.binary)
                self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
                self.assertIn("store is up to date", result.stdout)
                self.assertTrue((pod.root / "var/lib/latchkey/latchkey.db").is_file())

    def test_the_migration_hook_config_loads(self):
        # No PostgreSQL here: the Job's own command and config file, pointed at a scratch SQLite
        # store through the same LATCHKEY_STORE_URL override its Secret sets.
        pod = self.pod(render(SCENARIOS["postgres"]), "Job", "migrate")
        result = pod.run(self.binary, env={"LATCHKEY_STORE_URL": f"sqlite://{pod.root}/scratch.db"})
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn("store is up to date", result.stdout)

    def test_a_mistake_in_a_policy_fails_the_check(self):
        # The check above means something only if the binary refuses what it should.
        values = copy.deepcopy(SCENARIOS["sqlite"])
        values["policies"]["broken.toml"] = 'agent = "x"\nissuer = "nobody"\nttl = "15m"\n'
        pod = self.pod(render(values), "Deployment", "latchkey")
        result = pod.run(self.binary, "--check")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("broken.toml", result.stderr)


if __name__ == "__main__":
    unittest.main()
