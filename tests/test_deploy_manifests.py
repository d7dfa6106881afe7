"""The deployment files, validated offline the way CI can: no Docker engine, no cluster.

- Kubernetes: the CPU and GPU overlays are rendered in Python (deploy/render_k8s.py; compared with
  `kubectl kustomize` where that binary exists) and every document is checked by
  kubernetes-validate (strict: unknown fields fail) against the schemas it ships; then what the
  schema cannot say: one pinned bundle version in the Deployment and the index-load Job, probes on
  /healthz and /readyz, resources on every container, a GPU requested by the GPU variant only.
- docker-compose: check-jsonschema's builtin compose-spec schema (shipped in the package, offline),
  then two replicas on one pinned version and Prometheus scraping both.
- Dockerfile: it cannot be built here, so its inputs are checked: every COPY source exists and is
  not excluded by .dockerignore, the install steps name the lock and the pinned torch, every
  package folder pyproject maps is copied, and the runtime stage of the CPU image has no compiler.
Each validator is also shown a broken file, so a validator that accepts everything fails the test.
"""
from __future__ import annotations

import copy
import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
import render_k8s  # noqa: E402

sys.path.pop(0)

OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest cluster we claim, and the validator's newest schemas


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    return {render_k8s._key(d): d for d in render_k8s.render(DEPLOY / "k8s" / "overlays" / overlay)}


def container(doc: dict, name: str) -> dict:
    [c] = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# --- Kubernetes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_passes_kubernetes_validate(overlay, version):
    import kubernetes_validate

    docs = rendered(overlay)
    assert {k for k, _ in docs} >= {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "Job"}
    for key, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay} {key} fails Kubernetes {version}: {e.message} at {list(e.path)}")


def test_kubernetes_validate_rejects_a_broken_deployment():
    import kubernetes_validate

    dep = copy.deepcopy(rendered("cpu")[("Deployment", "sidrec")])
    container(dep, "sidrec")["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = copy.deepcopy(rendered("cpu")[("Deployment", "sidrec")])
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pins_one_bundle_version(overlay):
    docs = rendered(overlay)
    version = docs[("ConfigMap", "sidrec-release")]["data"]["bundle_version"]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version) and version not in ("current", "latest")
    serve = container(docs[("Deployment", "sidrec")], "sidrec")
    load = container(docs[("Job", "sidrec-index-load")], "index-load")
    assert env_of(serve)["SIDREC_BUNDLE_VERSION"] == version
    assert env_of(load)["SIDREC_BUNDLE_VERSION"] == version
    # Kubernetes expands $(VAR) from variables defined earlier in the same list.
    names = [e["name"] for e in serve["env"]]
    assert names.index("SIDREC_BUNDLE_VERSION") < names.index("SIDREC_BUNDLE_PATH")
    assert env_of(serve)["SIDREC_BUNDLE_PATH"] == "/bundles/$(SIDREC_BUNDLE_VERSION)"
    assert load["args"][:2] == ["index", "load"] and "/bundles/$(SIDREC_BUNDLE_VERSION)" in load["args"]
    assert "SIDREC_BUNDLE_PATH" not in docs[("ConfigMap", "sidrec-config")]["data"]  # no second source
    everything = yaml.safe_dump_all(list(docs.values()))
    assert "/bundles/current" not in everything and "PINNED-BY-RELEASE-YAML" not in everything
    assert serve["image"] == load["image"]  # the Job loads with the code that serves


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_probes_and_resources(overlay):
    docs = rendered(overlay)
    serve = container(docs[("Deployment", "sidrec")], "sidrec")
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["startupProbe"]["httpGet"]["path"] == "/healthz"
    for doc in (docs[("Deployment", "sidrec")], docs[("Job", "sidrec-index-load")]):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], c["name"]
    gpu = serve["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpu == "1" and serve["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert docs[("ConfigMap", "sidrec-config")]["data"]["SIDREC_DEVICE"] == "cuda"
        assert serve["image"].endswith("-cu124")
    else:
        assert gpu is None and docs[("ConfigMap", "sidrec-config")]["data"]["SIDREC_DEVICE"] == "cpu"
        assert serve["image"].endswith("-cpu")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: nothing to compare the "
                    "Python rendering with (the rendering itself is validated above)")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_rendering_equals_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {render_k8s._key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    mine = rendered(overlay)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert mine[key] == theirs[key], key


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(render_k8s.RenderError, match="namePrefix"):
        render_k8s.render(tmp_path)


# --- docker-compose ---------------------------------------------------------------------------------

def check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_passes_the_compose_spec_schema(tmp_path):
    ok = check_compose(DEPLOY / "docker-compose.yml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((DEPLOY / "docker-compose.yml").read_text().replace("read_only: true", "read_onyl: true"))
    rejected = check_compose(bad)
    assert rejected.returncode != 0 and "read_onyl" in rejected.stdout


def test_compose_runs_two_replicas_of_one_pinned_version_scraped_by_prometheus():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # YAML merge keys resolved
    services = compose["services"]
    replicas = sorted(n for n, s in services.items() if s.get("ports") and "SIDREC_BUNDLE_PATH" in s.get(
        "environment", {}))
    assert len(replicas) == 2, replicas
    paths = {services[n]["environment"]["SIDREC_BUNDLE_PATH"] for n in replicas}
    [path] = paths
    assert re.fullmatch(r"/bundles/[A-Za-z0-9][A-Za-z0-9._-]*", path) and path.rsplit("/", 1)[1] not in (
        "current", "latest", "demo")
    assert path in services["index-load"]["command"]  # the index loaded is the version served
    host_ports = {p for n in replicas for p in services[n]["ports"]}
    assert len(host_ports) == 2 and all(p.startswith("127.0.0.1:") for p in host_ports)
    assert "redis" in services and all(services[n]["environment"]["SIDREC_REDIS_URL"].startswith("redis://redis:")
                                       for n in replicas)
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "sidrec"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:8000" for n in replicas}
    assert any(v.endswith("/prometheus.yml:/etc/prometheus/prometheus.yml:ro")
               for v in services["prometheus"]["volumes"])


# --- Dockerfile --------------------------------------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def dockerignored(rel: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) for p in patterns if not p.startswith("!"))


def test_dockerfile_copies_what_exists_and_installs_from_the_lock():
    stages = dockerfile_stages()
    build, runtime = stages[1], stages[2]
    copied = []
    for stage in stages:
        for word, args in stage:
            if word == "COPY" and "--from=" not in args:
                *sources, _dest = args.split()
                for src in sources:
                    assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
                    assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
                    copied.append(src.rstrip("/"))
    runs = " ; ".join(a for w, a in build if w == "RUN")
    assert "pip install --require-hashes --no-deps -r requirements/serve.lock" in runs
    assert "pip install --no-deps ." in runs
    # torch first, at the version the lock was made with (the lock omits torch: its index varies)
    torch_at = runs.index('pip install "torch==${TORCH_VERSION}" --index-url')
    assert torch_at < runs.index("requirements/serve.lock")
    lock_torch = re.search(r"^torch==([0-9.]+)", (ROOT / "requirements" / "dev.lock").read_text(), re.M).group(1)
    args = dict(a.split("=", 1) for w, a in build if w == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == lock_torch
    assert not re.search(r"^torch==", (ROOT / "requirements" / "serve.lock").read_text(), re.M)
    # every folder pyproject maps into the wheel is in the build context
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        assert folder.split("/")[0] in copied, f"pyproject maps {folder} but the Dockerfile does not COPY it"
    assert "README.md" in " ".join(a for w, a in build if w == "COPY")  # pyproject's readme
    # the kernels are built here, with the module's own build command, and copied to the runtime
    assert "python -m sidrec.kernels.cpu_fused --build --out /opt/sidrec/kernels" in runs
    assert ("COPY", "--from=build /opt/sidrec/kernels /opt/sidrec/kernels") in runtime
    assert any(w == "ENV" and "SIDREC_KERNEL_DIR=/opt/sidrec/kernels" in a for w, a in runtime)
    assert ("ENTRYPOINT", '["python", "-m", "sidrec"]') in runtime and ("CMD", '["serve"]') in runtime
    assert any(w == "USER" and not a.startswith("0") for w, a in runtime)


def test_cpu_runtime_stage_installs_no_compiler():
    runtime = dockerfile_stages()[2]
    for word, args in runtime:
        if word == "RUN" and re.search(r"\b(gcc|clang|build-essential)\b", args):
            # only under the GPU variant's condition (Triton compiles its launchers at run time)
            assert re.match(r'if \[ "\$\{TORCH_VARIANT\}" != "cpu" \]; then', args), args
