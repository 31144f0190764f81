"""
The emulated Kubernetes API, exercised through the official client and a real kopf operator.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import kopf
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes.client import ApiException

from tests.testbed.apiserver import (
    ApiServerThread,
    EmulatedApiServer,
    json_merge_patch,
    parse_k8s_path,
    parse_label_selector,
    strategic_merge_patch,
)

T = TypeVar('T')

WIDGET_CRD: dict[str, Any] = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.ebbtide.dev
spec:
  group: test.ebbtide.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}, scale: {specReplicasPath: .spec.size, statusReplicasPath: .status.size}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, default: 1}
                colour: {type: string, default: blue}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
""")
WIDGETS = ('test.ebbtide.dev', 'v1', 'widgets')


def wait_for(probe: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f'Timed out after {timeout}s waiting for {probe}')
        time.sleep(interval)


@pytest.fixture()
def api(apiserver: ApiServerThread) -> Iterator[kubernetes.client.ApiClient]:
    with apiserver.api_client() as client:
        yield client


@pytest.fixture()
def core(api: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture()
def apps(api: kubernetes.client.ApiClient) -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api)


@pytest.fixture()
def custom(api: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def deployment(name: str, replicas: int = 1, **labels: str) -> dict[str, Any]:
    return {
        'metadata': {'name': name, 'labels': labels or {'app': name}},
        'spec': {
            'replicas': replicas,
            'selector': {'matchLabels': {'app': name}},
            'template': {
                'metadata': {'labels': {'app': name}},
                'spec': {'containers': [
                    {'name': 'server', 'image': 'vllm:1', 'env': [{'name': 'A', 'value': '1'}]},
                    {'name': 'sidecar', 'image': 'proxy:1'},
                ]},
            },
        },
    }


def status_of(error: ApiException) -> dict[str, Any]:
    return json.loads(error.body)


# ------------------------------------------------------------------------------------ pure helpers

def test_path_parsing_understands_namespaces_resource() -> None:
    assert parse_k8s_path('/api/v1/namespaces').plural == 'namespaces'
    ns = parse_k8s_path('/api/v1/namespaces/foo/status')
    assert (ns.plural, ns.name, ns.namespace, ns.subresource) == ('namespaces', 'foo', None, 'status')
    pod = parse_k8s_path('/api/v1/namespaces/ns/pods/p/status')
    assert (pod.plural, pod.name, pod.namespace, pod.subresource) == ('pods', 'p', 'ns', 'status')
    assert parse_k8s_path('/apis/apps').group == 'apps'


def test_merge_patches() -> None:
    assert json_merge_patch({'a': {'b': 1, 'c': 2}, 'd': [1]}, {'a': {'b': None}, 'd': [2]}) == {'a': {'c': 2}, 'd': [2]}
    patched = strategic_merge_patch(
        {'containers': [{'name': 'a', 'image': '1'}, {'name': 'b', 'image': '1'}], 'finalizers': ['x']},
        {'containers': [{'name': 'b', 'image': '2'}, {'name': 'c', 'image': '3'}], 'finalizers': ['y']})
    assert patched == {'containers': [{'name': 'a', 'image': '1'}, {'name': 'b', 'image': '2'},
                                      {'name': 'c', 'image': '3'}], 'finalizers': ['x', 'y']}
    assert strategic_merge_patch({'containers': [{'name': 'a'}, {'name': 'b'}]},
                                 {'containers': [{'name': 'a', '$patch': 'delete'}]}) == {'containers': [{'name': 'b'}]}


@pytest.mark.parametrize('selector, labels, expected', [
    ('a=b', {'a': 'b'}, True),
    ('a==b,c!=d', {'a': 'b', 'c': 'e'}, True),
    ('a==b,c!=d', {'a': 'b', 'c': 'd'}, False),
    ('e in (x, y),f', {'e': 'y', 'f': ''}, True),
    ('e in (x,y)', {'e': 'z'}, False),
    ('e notin (x,y),!g', {'e': 'z'}, True),
    ('!g', {'g': '1'}, False),
])
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert all(p(labels) for p in parse_label_selector(selector)) is expected


# ------------------------------------------------------------------------------- through the client

def test_discovery(api: kubernetes.client.ApiClient, apiserver: ApiServerThread) -> None:
    apiserver.register_crd(WIDGET_CRD)
    assert kubernetes.client.VersionApi(api).get_code().major == '1'
    core_names = {r.name for r in kubernetes.client.CoreV1Api(api).get_api_resources().resources}
    assert {'configmaps', 'events', 'namespaces', 'pods/status'} <= core_names
    groups = {g.name: g for g in kubernetes.client.ApisApi(api).get_api_versions().groups}
    assert groups['autoscaling'].preferred_version.version == 'v2'  # by priority, not by chance
    assert groups['test.ebbtide.dev'].preferred_version.version == 'v1'
    assert 'leases' in {r.name for r in kubernetes.client.CoordinationV1Api(api).get_api_resources().resources}


def test_create_assigns_server_metadata(core: kubernetes.client.CoreV1Api) -> None:
    first = core.create_namespaced_config_map('default', {'metadata': {'name': 'one'}, 'data': {'k': 'v'}})
    second = core.create_namespaced_config_map('default', {'metadata': {'generateName': 'two-'}})
    assert first.metadata.uid and first.metadata.uid != second.metadata.uid
    assert first.metadata.namespace == 'default'
    assert first.metadata.generation == 1
    assert first.metadata.creation_timestamp is not None
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert second.metadata.name.startswith('two-') and len(second.metadata.name) == len('two-') + 5
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map('default', {'metadata': {'name': 'one'}})
    assert e.value.status == 409 and status_of(e.value)['reason'] == 'AlreadyExists'
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map('absent', 'default')
    assert e.value.status == 404 and status_of(e.value)['kind'] == 'Status'


def test_list_has_kind_and_current_resource_version(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_config_map('default', {'metadata': {'name': 'a', 'labels': {'tier': 'x'}}})
    last = core.create_namespaced_config_map('other', {'metadata': {'name': 'b', 'labels': {'tier': 'y'}}})
    everything = core.list_config_map_for_all_namespaces()
    assert everything.kind == 'ConfigMapList' and everything.api_version == 'v1'
    assert everything.metadata.resource_version == last.metadata.resource_version
    assert [cm.metadata.name for cm in everything.items] == ['a', 'b']
    assert [cm.metadata.name for cm in core.list_namespaced_config_map('other').items] == ['b']
    selected = core.list_config_map_for_all_namespaces(label_selector='tier in (y,z)')
    assert [cm.metadata.name for cm in selected.items] == ['b']
    by_field = core.list_config_map_for_all_namespaces(field_selector='metadata.namespace=default')
    assert [cm.metadata.name for cm in by_field.items] == ['a']
    paged = core.list_config_map_for_all_namespaces(limit=1)
    assert len(paged.items) == 1 and paged.metadata._continue
    rest = core.list_config_map_for_all_namespaces(limit=1, _continue=paged.metadata._continue)
    assert [cm.metadata.name for cm in rest.items] == ['b'] and not rest.metadata._continue


def test_merge_and_strategic_patches(core: kubernetes.client.CoreV1Api, apps: kubernetes.client.AppsV1Api) -> None:
    core.create_namespaced_config_map('default', {'metadata': {'name': 'cm'}, 'data': {'a': '1', 'b': '2'}})
    patched = core.patch_namespaced_config_map('cm', 'default', {'data': {'a': None, 'c': '3'}},
                                               _content_type='application/merge-patch+json')
    assert patched.data == {'b': '2', 'c': '3'}

    apps.create_namespaced_deployment('default', deployment('vllm'))
    # The client's default for a dict body is a strategic merge patch.
    patched = apps.patch_namespaced_deployment('vllm', 'default', {'spec': {'replicas': 3, 'template': {'spec': {
        'containers': [{'name': 'server', 'image': 'vllm:2'}]}}}})
    containers = patched.spec.template.spec.containers
    assert patched.spec.replicas == 3
    assert [(c.name, c.image) for c in containers] == [('server', 'vllm:2'), ('sidecar', 'proxy:1')]
    assert containers[0].env[0].name == 'A'  # untouched fields of a merged item stay


def test_json_patch_and_failed_test_is_422(core: kubernetes.client.CoreV1Api) -> None:
    cm = core.create_namespaced_config_map('default', {'metadata': {'name': 'cm'}, 'data': {'a': '1'}})
    rv = cm.metadata.resource_version
    patched = core.patch_namespaced_config_map('cm', 'default', [
        {'op': 'test', 'path': '/metadata/resourceVersion', 'value': rv},
        {'op': 'add', 'path': '/metadata/finalizers', 'value': ['x/y']},
        {'op': 'replace', 'path': '/data/a', 'value': '2'},
    ])
    assert patched.metadata.finalizers == ['x/y'] and patched.data == {'a': '2'}
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_config_map('cm', 'default', [
            {'op': 'test', 'path': '/metadata/resourceVersion', 'value': rv},  # stale now
            {'op': 'remove', 'path': '/metadata/finalizers'},
        ])
    assert e.value.status == 422
    assert status_of(e.value)['kind'] == 'Status' and status_of(e.value)['code'] == 422
    assert core.read_namespaced_config_map('cm', 'default').metadata.finalizers == ['x/y']


def test_replace_with_stale_resource_version_conflicts(core: kubernetes.client.CoreV1Api) -> None:
    cm = core.create_namespaced_config_map('default', {'metadata': {'name': 'cm'}, 'data': {'a': '1'}})
    cm.data = {'a': '2'}
    replaced = core.replace_namespaced_config_map('cm', 'default', cm)
    assert replaced.data == {'a': '2'}
    assert int(replaced.metadata.resource_version) > int(cm.metadata.resource_version)
    assert replaced.metadata.uid == cm.metadata.uid
    cm.data = {'a': '3'}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map('cm', 'default', cm)
    assert e.value.status == 409 and status_of(e.value)['reason'] == 'Conflict'


def test_generation_and_status_subresource(apps: kubernetes.client.AppsV1Api) -> None:
    created = apps.create_namespaced_deployment('default', {**deployment('d'), 'status': {'replicas': 9}})
    assert created.metadata.generation == 1 and created.status is None  # status is ignored on create
    spec_patched = apps.patch_namespaced_deployment('d', 'default', {'spec': {'replicas': 2}})
    assert spec_patched.metadata.generation == 2
    meta_patched = apps.patch_namespaced_deployment('d', 'default', {'metadata': {'labels': {'x': 'y'}},
                                                                     'status': {'replicas': 5}})
    assert meta_patched.metadata.generation == 2 and meta_patched.status is None
    status_patched = apps.patch_namespaced_deployment_status('d', 'default', {
        'status': {'replicas': 2, 'readyReplicas': 1}, 'spec': {'replicas': 7}})
    assert status_patched.status.ready_replicas == 1
    assert status_patched.spec.replicas == 2 and status_patched.metadata.generation == 2
    assert int(status_patched.metadata.resource_version) > int(meta_patched.metadata.resource_version)

    # A no-op write is no write: no new resourceVersion (as in Kubernetes).
    again = apps.patch_namespaced_deployment('d', 'default', {'spec': {'replicas': 2}})
    assert again.metadata.resource_version == status_patched.metadata.resource_version


def test_pod_status_conditions_merge_by_type(core: kubernetes.client.CoreV1Api) -> None:
    """A readiness-gate owner and the kubelet write one pod's conditions; neither erases the other's."""
    core.create_namespaced_pod('default', {'metadata': {'name': 'p'}, 'spec': {
        'containers': [{'name': 'server', 'image': 'vllm:1'}],
        'readinessGates': [{'conditionType': 'ebbtide.dev/warmed-up'}]}})
    strategic = 'application/strategic-merge-patch+json'

    def conditions() -> dict[str, str]:
        return {c.type: c.status for c in core.read_namespaced_pod('p', 'default').status.conditions}

    core.patch_namespaced_pod_status('p', 'default', {'status': {'phase': 'Running', 'conditions': [
        {'type': 'ContainersReady', 'status': 'True'}, {'type': 'Ready', 'status': 'False'}]}},
        _content_type=strategic)
    core.patch_namespaced_pod_status('p', 'default', {'status': {'conditions': [
        {'type': 'ebbtide.dev/warmed-up', 'status': 'True', 'reason': 'WarmedUp'}]}}, _content_type=strategic)
    assert conditions() == {'ContainersReady': 'True', 'Ready': 'False', 'ebbtide.dev/warmed-up': 'True'}
    core.patch_namespaced_pod_status('p', 'default', {'status': {'conditions': [{'type': 'Ready', 'status': 'True'}]}},
                                     _content_type=strategic)
    assert conditions() == {'ContainersReady': 'True', 'Ready': 'True', 'ebbtide.dev/warmed-up': 'True'}
    # The status endpoint writes the status only.
    (gate,) = core.read_namespaced_pod('p', 'default').spec.readiness_gates
    assert gate.condition_type == 'ebbtide.dev/warmed-up'
    # A merge patch replaces the list as a whole (which is why the kubelet writes a strategic one).
    core.patch_namespaced_pod_status('p', 'default', {'status': {'conditions': [{'type': 'Ready', 'status': 'True'}]}},
                                     _content_type='application/merge-patch+json')
    assert conditions() == {'Ready': 'True'}


def test_scale_subresource(apps: kubernetes.client.AppsV1Api, custom: kubernetes.client.CustomObjectsApi,
                           apiserver: ApiServerThread) -> None:
    apps.create_namespaced_deployment('default', deployment('d', replicas=2))
    scale = apps.read_namespaced_deployment_scale('d', 'default')
    assert scale.spec.replicas == 2 and scale.status.selector == 'app=d'
    apps.patch_namespaced_deployment_scale('d', 'default', {'spec': {'replicas': 4}})
    assert apps.read_namespaced_deployment('d', 'default').spec.replicas == 4

    apiserver.register_crd(WIDGET_CRD)
    custom.create_namespaced_custom_object(*WIDGETS[:2], 'default', WIDGETS[2],
                                           {'apiVersion': 'test.ebbtide.dev/v1', 'kind': 'Widget',
                                            'metadata': {'name': 'w'}, 'spec': {'size': 3}})
    custom.patch_namespaced_custom_object_scale(*WIDGETS[:2], 'default', WIDGETS[2], 'w', {'spec': {'replicas': 5}})
    assert custom.get_namespaced_custom_object(*WIDGETS[:2], 'default', WIDGETS[2], 'w')['spec']['size'] == 5


def test_custom_resources_status_split_and_defaults(custom: kubernetes.client.CustomObjectsApi,
                                                    apiserver: ApiServerThread) -> None:
    apiserver.register_crd(WIDGET_CRD)
    group, version, plural = WIDGETS
    created = custom.create_namespaced_custom_object(group, version, 'default', plural, {
        'apiVersion': 'test.ebbtide.dev/v1', 'kind': 'Widget', 'metadata': {'name': 'w'},
        'spec': {'size': 2}, 'status': {'phase': 'ignored'}})
    assert created['spec'] == {'size': 2, 'colour': 'blue'}  # the schema's default is applied
    assert 'status' not in created
    main = custom.patch_namespaced_custom_object(group, version, 'default', plural, 'w',
                                                 {'spec': {'size': 3}, 'status': {'phase': 'nope'}})
    assert main['spec']['size'] == 3 and 'status' not in main and main['metadata']['generation'] == 2
    status = custom.patch_namespaced_custom_object_status(group, version, 'default', plural, 'w',
                                                          {'spec': {'size': 9}, 'status': {'phase': 'Ready'}})
    assert status['status'] == {'phase': 'Ready'} and status['spec']['size'] == 3
    assert status['metadata']['generation'] == 2
    assert apiserver.server.get_object('test.ebbtide.dev/v1/widgets', 'default', 'w')['status'] == {'phase': 'Ready'}


def test_crd_created_through_the_api(api: kubernetes.client.ApiClient,
                                     custom: kubernetes.client.CustomObjectsApi) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(WIDGET_CRD)
    crd = extensions.read_custom_resource_definition('widgets.test.ebbtide.dev')
    assert {c.type: c.status for c in crd.status.conditions}['Established'] == 'True'
    custom.create_namespaced_custom_object(*WIDGETS[:2], 'default', WIDGETS[2], {
        'apiVersion': 'test.ebbtide.dev/v1', 'kind': 'Widget', 'metadata': {'name': 'w'}})
    assert [w['metadata']['name'] for w in custom.list_cluster_custom_object(*WIDGETS)['items']] == ['w']

    extensions.delete_custom_resource_definition('widgets.test.ebbtide.dev')
    with pytest.raises(ApiException) as e:
        custom.list_cluster_custom_object(*WIDGETS)
    assert e.value.status == 404


def test_watch_resumes_from_resource_version(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_config_map('default', {'metadata': {'name': 'a', 'labels': {'w': '1'}}})
    listed = core.list_namespaced_config_map('default')
    core.create_namespaced_config_map('default', {'metadata': {'name': 'b', 'labels': {'w': '1'}}})
    core.patch_namespaced_config_map('a', 'default', {'data': {'x': 'y'}})
    core.create_namespaced_config_map('default', {'metadata': {'name': 'c'}})  # not selected below

    watch = kubernetes.watch.Watch()
    events = list(watch.stream(core.list_namespaced_config_map, 'default', label_selector='w=1',
                               resource_version=listed.metadata.resource_version, timeout_seconds=1))
    assert [(e['type'], e['object'].metadata.name) for e in events] == [('ADDED', 'b'), ('MODIFIED', 'a')]
    assert all(e['object'].metadata.resource_version for e in events)
    assert events[-1]['object'].data == {'x': 'y'}

    # Without a resourceVersion, a watch starts with the current objects.
    initial = list(kubernetes.watch.Watch().stream(core.list_namespaced_config_map, 'default', timeout_seconds=1))
    assert sorted(e['object'].metadata.name for e in initial) == ['a', 'b', 'c']
    assert {e['type'] for e in initial} == {'ADDED'}


def test_watch_streams_live_events_and_times_out(core: kubernetes.client.CoreV1Api) -> None:
    listed = core.list_namespaced_config_map('default')
    events: list[tuple[str, str]] = []

    def consume() -> None:
        for event in kubernetes.watch.Watch().stream(core.list_namespaced_config_map, 'default',
                                                     resource_version=listed.metadata.resource_version,
                                                     field_selector='metadata.name=live', timeout_seconds=2):
            events.append((event['type'], event['object'].metadata.name))

    started = time.monotonic()
    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    core.create_namespaced_config_map('default', {'metadata': {'name': 'other'}})
    core.create_namespaced_config_map('default', {'metadata': {'name': 'live'}})
    core.delete_namespaced_config_map('live', 'default')
    thread.join(timeout=10)
    assert not thread.is_alive() and 1.5 < time.monotonic() - started < 5
    assert events == [('ADDED', 'live'), ('DELETED', 'live')]


def test_watch_bookmarks_and_initial_events_end(core: kubernetes.client.CoreV1Api, apiserver: ApiServerThread) -> None:
    core.create_namespaced_config_map('default', {'metadata': {'name': 'a'}})
    apiserver.server.bookmark_interval = 0.3
    url = (f'{apiserver.url}/api/v1/namespaces/default/configmaps?watch=true&allowWatchBookmarks=true'
           f'&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1')
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers['Content-Type'].startswith('application/json')
        events = [json.loads(line) for line in response if line.strip()]
    assert [e['type'] for e in events[:2]] == ['ADDED', 'BOOKMARK']
    assert events[1]['object']['metadata']['annotations'] == {'k8s.io/initial-events-end': 'true'}
    assert len(events) >= 4 and {e['type'] for e in events[2:]} == {'BOOKMARK'}  # idle bookmarks
    assert events[-1]['object']['metadata']['resourceVersion'] == str(apiserver.server.resource_version)


def test_watch_from_a_forgotten_resource_version_is_gone(core: kubernetes.client.CoreV1Api,
                                                          apiserver: ApiServerThread) -> None:
    apiserver.server.max_events = 4
    first = core.create_namespaced_config_map('default', {'metadata': {'name': 'cm'}})
    for value in range(5):
        core.patch_namespaced_config_map('cm', 'default', {'data': {'v': str(value)}})
    with pytest.raises(ApiException) as e:
        list(kubernetes.watch.Watch().stream(core.list_namespaced_config_map, 'default',
                                             resource_version=first.metadata.resource_version, timeout_seconds=1))
    assert e.value.status == 410


def test_finalizers_hold_deletion(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_config_map('default', {'metadata': {'name': 'cm', 'finalizers': ['x/y']}})
    core.delete_namespaced_config_map('cm', 'default')
    held = core.read_namespaced_config_map('cm', 'default')
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map('cm', 'default', {'metadata': {'finalizers': None}},
                                     _content_type='application/merge-patch+json')
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map('cm', 'default')
    assert e.value.status == 404


def test_garbage_collection_by_owner_references(core: kubernetes.client.CoreV1Api) -> None:
    def make(name: str, *owners: Any) -> Any:
        refs = [{'apiVersion': 'v1', 'kind': 'ConfigMap', 'name': o.metadata.name, 'uid': o.metadata.uid}
                for o in owners]
        return core.create_namespaced_config_map('default', {'metadata': {'name': name, 'ownerReferences': refs}})

    parent = make('parent')
    other = make('other')
    child = make('child', parent)
    make('grandchild', child)
    make('shared', parent, other)
    core.delete_namespaced_config_map('parent', 'default')
    names = {cm.metadata.name for cm in core.list_namespaced_config_map('default').items}
    assert names == {'other', 'shared'}
    assert [r.name for r in core.read_namespaced_config_map('shared', 'default').metadata.owner_references] == ['other']

    orphaned_parent = make('orphaned-parent')
    make('orphan', orphaned_parent)
    core.delete_namespaced_config_map('orphaned-parent', 'default', propagation_policy='Orphan')
    assert core.read_namespaced_config_map('orphan', 'default').metadata.owner_references is None


def test_namespaces_events_and_leases(api: kubernetes.client.ApiClient, core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespace({'metadata': {'name': 'team'}})
    assert core.read_namespace('team').status.phase == 'Active'
    event = core.create_namespaced_event('team', {
        'metadata': {'generateName': 'kopf-event-'}, 'involvedObject': {'kind': 'Widget', 'name': 'w'},
        'reason': 'Testing', 'message': 'hello', 'type': 'Normal'})
    assert event.metadata.name.startswith('kopf-event-')
    coordination = kubernetes.client.CoordinationV1Api(api)
    coordination.create_namespaced_lease('team', {'metadata': {'name': 'leader'}, 'spec': {'holderIdentity': 'me'}})
    assert coordination.read_namespaced_lease('leader', 'team').spec.holder_identity == 'me'

    core.delete_namespace('team')
    assert 'team' not in {ns.metadata.name for ns in core.list_namespace().items}
    assert core.list_namespaced_event('team').items == []


def test_intercepting_reaction_prevents_the_write(core: kubernetes.client.CoreV1Api, apiserver: ApiServerThread) -> None:
    import kmock
    core.create_namespaced_config_map('default', {'metadata': {'name': 'cm'}, 'data': {'a': '1'}})
    apiserver.server['patch', kmock.resource('v1/configmaps')] << 503
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_config_map('cm', 'default', {'data': {'a': '2'}})
    assert e.value.status == 503
    assert apiserver.server.get_object('v1/configmaps', 'default', 'cm')['data'] == {'a': '1'}


def test_standalone_process(tmp_path: Any) -> None:
    crd_path = tmp_path / 'crd.yaml'
    crd_path.write_text(yaml.safe_dump(WIDGET_CRD))
    kubeconfig = tmp_path / 'kubeconfig'
    process = subprocess.Popen(
        [sys.executable, '-m', 'tests.testbed.apiserver', '--port', '0', '--crd', str(crd_path),
         '--kubeconfig', str(kubeconfig)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith('Serving the emulated Kubernetes API at http://127.0.0.1:'), line
        with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as client:
            custom = kubernetes.client.CustomObjectsApi(client)
            custom.create_namespaced_custom_object(*WIDGETS[:2], 'default', WIDGETS[2], {
                'apiVersion': 'test.ebbtide.dev/v1', 'kind': 'Widget', 'metadata': {'name': 'w'}, 'spec': {}})
            stored = custom.get_namespaced_custom_object(*WIDGETS[:2], 'default', WIDGETS[2], 'w')
            assert stored['spec'] == {'size': 1, 'colour': 'blue'}  # the CRD from --crd, with its defaults
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# ---------------------------------------------------------------------------------- a kopf operator

OPERATOR = textwrap.dedent('''
    import kopf
    import kubernetes


    @kopf.on.login()
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)  # the default kubeconfig: the emulated server's


    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.loggers = True  # post handlers' log messages as v1/events
        settings.watching.server_timeout = 5  # exercise watch resumption from resourceVersion


    def core():
        kubernetes.config.load_kube_config()  # the default kubeconfig: the emulated server's
        return kubernetes.client.CoreV1Api()


    @kopf.on.create('test.ebbtide.dev', 'v1', 'widgets')
    def create_fn(name, namespace, uid, spec, patch, retry, **_):
        if retry == 0:  # exercise kopf's progress storage in annotations
            raise kopf.TemporaryError('Not yet.', delay=0.2)
        owner = {'apiVersion': 'test.ebbtide.dev/v1', 'kind': 'Widget', 'name': name, 'uid': uid,
                 'controller': True, 'blockOwnerDeletion': True}
        core().create_namespaced_config_map(namespace, {
            'metadata': {'name': f'{name}-config', 'ownerReferences': [owner]},
            'data': {'size': str(spec['size'])},
        })
        patch.status['phase'] = 'Created'
        return {'configmap': f'{name}-config'}


    @kopf.on.update('test.ebbtide.dev', 'v1', 'widgets', field='spec.size')
    def update_fn(name, namespace, new, patch, **_):
        core().patch_namespaced_config_map(f'{name}-config', namespace, {'data': {'size': str(new)}})
        patch.status['phase'] = f'Resized to {new}'


    @kopf.on.delete('test.ebbtide.dev', 'v1', 'widgets')
    def delete_fn(name, logger, **_):
        logger.info(f'Deleting widget {name}')
''')


def test_kopf_operator_against_the_emulated_api(apiserver: ApiServerThread, custom: kubernetes.client.CustomObjectsApi,
                                                core: kubernetes.client.CoreV1Api, tmp_path: Any) -> None:
    server: EmulatedApiServer = apiserver.server
    server.register_crd(WIDGET_CRD)
    operator_path = tmp_path / 'operator.py'
    operator_path.write_text(OPERATOR)
    group, version, plural = WIDGETS

    def widget() -> dict[str, Any]:
        return custom.get_namespaced_custom_object(group, version, 'default', plural, 'w')

    def config_map() -> Any:
        items = core.list_namespaced_config_map('default', field_selector='metadata.name=w-config').items
        return items[0] if items else None

    runner = KopfRunner(['run', '--standalone', '-A', '--verbose', str(operator_path)],
                        registry=kopf.OperatorRegistry(), timeout=30)
    with apiserver.as_default_kubeconfig(), runner:
        custom.create_namespaced_custom_object(group, version, 'default', plural, {
            'apiVersion': 'test.ebbtide.dev/v1', 'kind': 'Widget', 'metadata': {'name': 'w'}, 'spec': {'size': 2}})

        created = wait_for(config_map)
        assert created.data == {'size': '2'}
        assert created.metadata.owner_references[0].uid == widget()['metadata']['uid']
        body = wait_for(lambda: (w := widget()).get('status', {}).get('phase') == 'Created' and w)
        assert body['status']['create_fn'] == {'configmap': 'w-config'}
        assert 'kopf.zalando.org/KopfFinalizerMarker' in body['metadata']['finalizers']
        annotations = wait_for(lambda: (a := widget()['metadata'].get('annotations', {}))
                               and 'kopf.zalando.org/last-handled-configuration' in a and a)
        assert 'kopf.zalando.org/create_fn' not in annotations  # the progress is purged (null deletes keys)

        time.sleep(5.5)  # let kopf's watches time out and resume from their resourceVersions
        custom.patch_namespaced_custom_object(group, version, 'default', plural, 'w', {'spec': {'size': 5}})
        wait_for(lambda: config_map().data == {'size': '5'})
        wait_for(lambda: widget()['status'].get('phase') == 'Resized to 5')
        wait_for(lambda: json.loads(widget()['metadata']['annotations'][
            'kopf.zalando.org/last-handled-configuration']).get('spec', {}).get('size') == 5)

        custom.delete_namespaced_custom_object(group, version, 'default', plural, 'w')
        wait_for(lambda: config_map() is None)  # the finalizer is released, the owner is gone, the GC ran
        with pytest.raises(ApiException):
            widget()

    assert runner.exit_code == 0, runner.output
    assert runner.exception is None
    assert "Handler 'create_fn' failed temporarily: Not yet." in runner.output
    assert "Handler 'create_fn' succeeded" in runner.output
    assert "Handler 'update_fn/spec.size' succeeded" in runner.output
    assert "Handler 'delete_fn' succeeded" in runner.output
    assert 'Deleting widget w' in runner.output
    # kopf saw each of its own patches come back: it never waited out a consistency timeout.
    assert 'Timed out' not in runner.output and 'inconsistencies' not in runner.output
    # The watches were resumed, not replayed: the creation was handled exactly once.
    assert runner.output.count("Handler 'create_fn' succeeded") == 1
    # kopf kept its progress in an annotation while the handler was being retried.
    history = server.call(lambda: [v.raw for v in server.objects[f'{group}/{version}/{plural}', 'default', 'w'].history
                                   if v is not None])
    assert any('kopf.zalando.org/create_fn' in v['metadata'].get('annotations', {}) for v in history)
    events = server.list_objects('v1/events', 'default')
    assert any(e['reason'] == 'Logging' and 'create_fn' in e['message'] for e in events)
