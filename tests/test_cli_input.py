"""Bad input to any `ebbtide` command gets one clear line on stderr and a non-zero exit (2 for
usage and input errors), never a traceback; `ebbtide run` without a cluster says why and retries."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ebbtide.api.manifest import NAME_MAX, InvalidSpec, load_manifests, parse_spec
from tests.cli import ebbtide, refused
from tests.testbed.replays import CLI_ENV

SERVICE = {"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": "chat"}, "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}}}


def manifest(tmp_path: Path, text: str | bytes, name: str = "in.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def service(**changes) -> str:
    doc = {**SERVICE, **changes}
    return yaml.safe_dump(doc)


BAD_FILES = {
    "not YAML": ("a: [b\n", "not valid YAML at line 2"),
    "a top-level list": ("- a\n- b\n", "document 1: expected a Kubernetes object (a mapping), found a list"),
    "a scalar": ("hello\n", "found a string"),
    "not UTF-8": (b"\xff\xfe\x00kind: x", "not UTF-8 text"),
    "empty": ("", "the file is empty"),
    "no InferenceService": ("apiVersion: v1\nkind: ConfigMap\n", "no InferenceService in this file"),
    "a name that is no DNS label": (service(metadata={"name": "Chat_1"}), "metadata.name 'Chat_1' must be"),
    "a name too long": (service(metadata={"name": "a" * (NAME_MAX + 1)}), f"at most {NAME_MAX}"),
    "a memory that is no quantity": (
        service(spec={**SERVICE["spec"], "engine": {"resources": {"limits": {"memory": "lots"}}}}),
        "spec.engine.resources.limits.memory: 'lots' is not a Kubernetes quantity"),
    "deep nesting": ("a: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
}


@pytest.mark.parametrize("command", ["render", "simulate"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_manifest_is_one_line(tmp_path, command, case):
    text, said = BAD_FILES[case]
    path = manifest(tmp_path, text)
    refused(ebbtide(command, path), f"ebbtide {command}: {path}: ", said)


@pytest.mark.parametrize("command", ["render", "simulate"])
def test_a_missing_file_and_a_directory_are_one_line(tmp_path, command):
    refused(ebbtide(command, tmp_path / "nope.yaml"), "No such file or directory")
    refused(ebbtide(command, tmp_path), "Is a directory")


def test_render_reads_the_items_of_a_kubectl_list(tmp_path):
    listed = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
              "items": [{**SERVICE, "metadata": {"name": "chat", "namespace": "ml"}},
                        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}}]}
    result = ebbtide("render", manifest(tmp_path, yaml.safe_dump(listed)))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert {(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects} == {
        ("Deployment", "chat", "ml"), ("Service", "chat", "ml"), ("PodDisruptionBudget", "chat", "ml")}


def test_names_derived_from_the_longest_name_are_dns_labels(tmp_path):
    longest = "a" * NAME_MAX
    ((ref, _),) = load_manifests(manifest(tmp_path, service(metadata={"name": longest})))
    assert len(f"{ref.name}-demand-profile") <= 63 and len(f"{ref.name}-spot") <= 63
    for bad in ("1chat", "chat-", "a.b", "", "-x"):
        with pytest.raises(InvalidSpec, match="metadata.name"):
            load_manifests(manifest(tmp_path, service(metadata={"name": bad})))


@pytest.mark.parametrize("value", ["500m", "32Gi", "1.5", ".5", "1e3", "+2", 4, 0])
def test_quantities_kubernetes_takes_are_taken(value):
    spec = parse_spec({"model": {"name": "m"}, "engine": {"resources": {"requests": {"cpu": value}}},
                       "sleep": {"hostMemory": value}})
    assert spec.engine.resources.requests["cpu"] == value and spec.sleep.host_memory == value


@pytest.mark.parametrize("value", ["lots", "32 Gi", "1Gb", "-1", -1, 1.5, True, "", "1e", None])
def test_what_is_no_quantity_is_refused_in_one_sentence(value):
    # parse_spec is what the operator calls too: SpecValid=False with this message.
    with pytest.raises(InvalidSpec, match=r"^spec\.sleep\.hostMemory: [^;]*(not a Kubernetes quantity|negative)"):
        parse_spec({"model": {"name": "m"}, "sleep": {"hostMemory": value}})


def test_crd_into_a_directory_it_cannot_make():
    # Under a regular file: refused even to root, whom permission bits do not stop.
    refused(ebbtide("crd", "--output-dir", "/etc/hostname/crds"), "ebbtide crd: cannot write /etc/hostname/crds")


def test_engine_sim_refuses_a_port_out_of_range_and_one_in_use():
    refused(ebbtide("engine-sim", "--port", "99999"), "argument --port: must be at least 0 and at most 65535")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = refused(ebbtide("engine-sim", "--port", taken.getsockname()[1]), status=1)
    assert "cannot serve" in line and "address already in use" in line


@pytest.mark.parametrize("option", ["--metrics-port", "--health-port"])
def test_run_refuses_a_port_out_of_range(option):
    refused(ebbtide("run", option, "70000"), f"ebbtide run: argument {option}: must be")


@pytest.mark.parametrize("namespace", ["team-*", "Team-A", ""])
def test_run_refuses_a_namespace_that_is_no_name(namespace):
    """The scaling loop lists in each namespace by name (what a Role there permits): no patterns."""
    refused(ebbtide("run", "--namespace", namespace), "ebbtide run: argument -n/--namespace: not a namespace name")


OPERATOR = ("run", "--metrics-port", "0", "--health-port", "0")


def operator_without_a_cluster(kubeconfig: Path, command: tuple[str, ...] = OPERATOR) -> tuple[str, str]:
    """`ebbtide run` (or another `command` that needs the API server) for as long as it takes to
    try twice (1 s apart), then SIGTERM: (the first complaint, everything it wrote)."""
    env = {k: v for k, v in CLI_ENV.items() if not k.startswith("KUBERNETES_")}  # not in a cluster
    env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.Popen([sys.executable, "-m", "ebbtide.cli", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 90  # the imports alone take seconds on a busy machine
            while output.count(b"retrying in") < 2 and time.monotonic() < deadline and proc.poll() is None:
                if selector.select(timeout=1):
                    output += os.read(proc.stdout.fileno(), 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        output += proc.communicate(timeout=30)[0]
    text = output.decode()
    complaints = [line for line in text.splitlines() if "retrying in" in line]
    assert len(complaints) >= 2, text  # it keeps trying
    assert "Traceback" not in text, text
    assert "retrying in 1 s" in complaints[0] and "retrying in 2 s" in complaints[1], complaints  # backoff
    return complaints[0], text


def test_run_without_credentials_says_so_and_retries(tmp_path):
    missing = tmp_path / "no-kubeconfig"
    complaint, _ = operator_without_a_cluster(missing)
    assert "no Kubernetes credentials: not in a cluster" in complaint and str(missing) in complaint


def test_activator_without_credentials_says_so_and_retries(tmp_path):
    missing = tmp_path / "no-kubeconfig"
    complaint, _ = operator_without_a_cluster(missing, ("activator", "--service", "chat"))
    assert "no Kubernetes credentials: not in a cluster" in complaint and str(missing) in complaint


def test_run_with_an_unreachable_api_server_says_so_and_retries(tmp_path):
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "x",
                  "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                  "users": [{"name": "u", "user": {"token": "t"}}],
                  "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}
    path = manifest(tmp_path, yaml.safe_dump(kubeconfig), "kubeconfig")
    complaint, _ = operator_without_a_cluster(path)
    assert "cannot reach the Kubernetes API server at https://127.0.0.1:1: Connection refused" in complaint
