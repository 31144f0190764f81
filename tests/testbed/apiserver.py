"""
An in-memory Kubernetes API over HTTP for kopf and the official kubernetes client.

`EmulatedApiServer` extends kmock's `KubernetesEmulator` (pinned: kmock==0.8) with the
server behaviour that kopf and the client depend on and kmock lacks: server-owned
metadata (uid, resourceVersion, generation, creationTimestamp, generateName), the three
patch flavours plus PUT with optimistic concurrency, the status and scale subresources,
list kinds and resource versions, label and field selectors, watches that resume from a
resource version, finalizers, garbage collection by owner references, namespaces, and
custom resource definitions (registered from YAML or created through the API).

Writes happen in the emulator's fallback reactions, so a kmock reaction that intercepts
a request (``server['patch', kmock.resource('apps/v1/deployments')] << 500``) prevents
the write, the same as a failing real API server.

Run it in-process with `ApiServerThread` (see the ``apiserver`` fixture in
``tests/testbed/fixtures.py``) or as a process::

    python -m tests.testbed.apiserver --port 8001 --crd crds/x.yaml --kubeconfig /tmp/kc

Known gaps (deliberate, for now): no controllers (Deployments get no pods or status); no
schema validation or pruning of custom resources (defaults are applied); no auth, RBAC,
admission, OpenAPI, Tables for built-in kinds (custom resources get theirs, from the CRD's
printer columns), protobuf or CBOR bodies (kubectl writes built-in types as protobuf: use
``kubectl apply --validate=false``); server-side apply is a strategic
merge plus create; Foreground deletion acts as Background, and the garbage collector runs
synchronously; objects may be created in namespaces that do not exist; every API version
of a resource is stored apart (no conversion); ``dryRun`` is refused with 400; lists
always answer the latest state (``resourceVersion``/``resourceVersionMatch`` are ignored).
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import contextlib
import copy
import datetime
import functools
import gzip
import importlib.resources
import json
import logging
import os
import pathlib
import random
import re
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import apps, parsing, references, rendering

from tests.testbed.kubeconfig import client_configuration, write_kubeconfig

logger = logging.getLogger(__name__)

Body = dict[str, Any]
ObjectKey = tuple[kmock.resource, str | None, str]

CRD_RESOURCE = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
NAMESPACE_RESOURCE = kmock.resource('', 'v1', 'namespaces')
INITIAL_NAMESPACES = ('default', 'kube-system', 'kube-public', 'kube-node-lease')
ALL_VERBS = frozenset({'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'})

# Fields of metadata that only the server writes; clients' values are ignored.
SERVER_OWNED_METADATA = ('uid', 'resourceVersion', 'generation', 'creationTimestamp', 'deletionTimestamp',
                         'deletionGracePeriodSeconds', 'selfLink', 'managedFields')
# Kept from the stored object on every update, whatever the client sends.
IMMUTABLE_METADATA = ('name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp',
                      'deletionGracePeriodSeconds', 'generation', 'selfLink')
# Go's `omitempty` drops these when empty, so clients never see `finalizers: []`.
OMITTED_WHEN_EMPTY = ('finalizers', 'labels', 'annotations', 'ownerReferences')

# As Kubernetes' names.SimpleNameGenerator: no vowels, no look-alike digits.
GENERATED_NAME_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789'

MERGE_PATCH = 'application/merge-patch+json'
STRATEGIC_MERGE_PATCH = 'application/strategic-merge-patch+json'
JSON_PATCH = 'application/json-patch+json'
APPLY_PATCH = 'application/apply-patch+yaml'

# Strategic merge keys of the commonly patched lists (from the Kubernetes API's patchMergeKey tags).
# A list under one of these keys merges item by item; any other list is replaced as a whole.
STRATEGIC_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    'containers': ('name',),
    'initContainers': ('name',),
    'ephemeralContainers': ('name',),
    'env': ('name',),
    'volumes': ('name',),
    'volumeMounts': ('mountPath',),
    'volumeDevices': ('devicePath',),
    'imagePullSecrets': ('name',),
    'ports': ('containerPort', 'port'),  # container ports vs. service ports
    'conditions': ('type',),
    'ownerReferences': ('uid',),
    'hostAliases': ('ip',),
    'topologySpreadConstraints': ('topologyKey',),
    'resourceClaims': ('name',),
}
# Lists of scalars that strategic merge treats as sets (patchStrategy "merge").
STRATEGIC_SET_LISTS = frozenset({'finalizers'})


class ScalePaths(NamedTuple):
    """Where a resource keeps what its `/scale` subresource shows (as in a CRD's scale spec)."""
    spec_replicas: str = '.spec.replicas'
    status_replicas: str = '.status.replicas'
    label_selector: str | None = None  # None: render `.spec.selector` as a LabelSelector


BUILTIN_SCALE = {
    kmock.resource('apps', 'v1', 'deployments'): ScalePaths(),
    kmock.resource('apps', 'v1', 'replicasets'): ScalePaths(),
    kmock.resource('apps', 'v1', 'statefulsets'): ScalePaths(),
}


class WatchEvent(NamedTuple):
    rv: int
    resource: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: Body
    old: Body | None  # the previous state, to tell selector transitions apart


# --------------------------------------------------------------------------------------------------
# Errors, as Kubernetes renders them (kmock turns KubernetesError into a v1/Status body).
# --------------------------------------------------------------------------------------------------

def api_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {'causes': []})


def _qualified(resource: kmock.resource) -> str:
    return f'{resource.plural}.{resource.group}' if resource.group else str(resource.plural)


def not_found(resource: kmock.resource, name: str) -> kmock.KubernetesError:
    return api_error(404, 'NotFound', f'{_qualified(resource)} "{name}" not found',
                     name=name, group=resource.group, kind=resource.plural)


def conflict(resource: kmock.resource, name: str) -> kmock.KubernetesError:
    return api_error(409, 'Conflict',
                     f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": the object has been '
                     f'modified; please apply your changes to the latest version and try again',
                     name=name, group=resource.group, kind=resource.plural)


def bad_request(message: str) -> kmock.KubernetesError:
    return api_error(400, 'BadRequest', message)


def invalid(resource: kmock.resource, name: str | None, message: str) -> kmock.KubernetesError:
    return api_error(422, 'Invalid', message, name=name, group=resource.group, kind=resource.plural)


# --------------------------------------------------------------------------------------------------
# Pure helpers: paths, patches, selectors, schema defaults.
# --------------------------------------------------------------------------------------------------

def parse_k8s_path(path: str) -> parsing.ParsedPath:
    """
    Split an API path into group/version/namespace/plural/name/subresource.

    Unlike kmock 0.8's parser, this one understands the ``namespaces`` resource itself:
    ``/api/v1/namespaces`` (kmock raises) and ``/api/v1/namespaces/NAME[/status]``
    (kmock reads the name as the namespace of a nameless resource).
    """
    parts = path.strip('/').split('/')
    if len(parts) >= 2 and parts[0] == 'api':
        group, version, rest = '', parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == 'apis':
        group, version, rest = parts[1], parts[2], parts[3:]
    elif len(parts) == 2 and parts[0] == 'apis':
        return parsing.ParsedPath(group=parts[1])  # group discovery: /apis/GROUP
    else:
        return parsing.ParsedPath()

    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == 'namespaces' and rest[2] not in ('status', 'finalize'):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if len(rest) >= 1 and rest[0] else None
    name = rest[1] if len(rest) >= 2 and rest[1] else None
    subresource = '/'.join(rest[2:]) or None
    return parsing.ParsedPath(group=group, version=version, plural=plural,
                              namespace=namespace, name=name, subresource=subresource)


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """
    A useful subset of Kubernetes' strategic merge patch.

    Dicts merge as in a merge patch; lists named in `STRATEGIC_MERGE_KEYS` merge item by
    item on their merge key; ``finalizers`` merge as sets; other lists are replaced.
    Directives: ``$patch: replace|delete`` in dicts and list items; other ``$``-keys
    (``$setElementOrder``, ``$retainKeys``, ``$deleteFromPrimitiveList``) are ignored.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get('$patch')
    if directive == 'replace':
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != '$patch'}
    if directive == 'delete':
        return None
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith('$'):
            continue
        current = result.get(key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(current, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and isinstance(current, list) and key in STRATEGIC_SET_LISTS:
            result[key] = list(current) + [item for item in value if item not in current]
        elif isinstance(value, list) and isinstance(current, list) and key in STRATEGIC_MERGE_KEYS:
            result[key] = _merge_list_by_key(current, value, STRATEGIC_MERGE_KEYS[key])
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list_by_key(current: list[Any], patch: list[Any], candidates: tuple[str, ...]) -> list[Any]:
    items = [item for item in patch + current if isinstance(item, dict)]
    merge_key = next((k for k in candidates if any(k in item for item in items)), None)
    if merge_key is None or not all(isinstance(item, dict) for item in patch):
        return copy.deepcopy(patch)
    result = list(current)
    for item in patch:
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, dict) and merge_key in item and old.get(merge_key) == item[merge_key]),
                     None)
        if item.get('$patch') == 'delete':
            if index is not None:
                del result[index]
        elif index is None:
            result.append({k: copy.deepcopy(v) for k, v in item.items() if not k.startswith('$')})
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def _split_selector(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for index, char in enumerate(text):
        if char == '(':
            depth += 1
        elif char == ')':
            depth -= 1
        elif char == ',' and depth == 0:
            yield text[start:index]
            start = index + 1
    yield text[start:]


_KEY = r'[A-Za-z0-9_./-]+'
_LABEL_NOT_EXISTS = re.compile(rf'\s*!\s*({_KEY})\s*')
_LABEL_SET = re.compile(rf'\s*({_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*')
_LABEL_EQUALITY = re.compile(rf'\s*({_KEY})\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*')
_LABEL_EXISTS = re.compile(rf'\s*({_KEY})\s*')
LabelPredicate = Callable[[Mapping[str, str]], bool]


def parse_label_selector(text: str | None) -> list[LabelPredicate]:
    """``a=b,c!=d,e in (x,y),f notin (z),g,!h`` into predicates over a labels dict."""
    predicates: list[LabelPredicate] = []
    for term in _split_selector(text or ''):
        if not term.strip():
            continue
        if m := _LABEL_NOT_EXISTS.fullmatch(term):
            predicates.append(lambda labels, k=m[1]: k not in labels)
        elif m := _LABEL_SET.fullmatch(term):
            values = frozenset(v.strip() for v in m[3].split(',') if v.strip())
            if m[2] == 'in':
                predicates.append(lambda labels, k=m[1], vs=values: labels.get(k) in vs)
            else:
                predicates.append(lambda labels, k=m[1], vs=values: labels.get(k) not in vs)
        elif m := _LABEL_EQUALITY.fullmatch(term):
            if m[2] == '!=':
                predicates.append(lambda labels, k=m[1], v=m[3]: labels.get(k) != v)
            else:
                predicates.append(lambda labels, k=m[1], v=m[3]: labels.get(k) == v)
        elif m := _LABEL_EXISTS.fullmatch(term):
            predicates.append(lambda labels, k=m[1]: k in labels)
        else:
            raise bad_request(f'unable to parse requirement: {term!r} in labelSelector {text!r}')
    return predicates


FieldPredicate = Callable[[Body], bool]
_FIELD_TERM = re.compile(r'\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*([^,]*?)\s*')


def parse_field_selector(text: str | None) -> list[FieldPredicate]:
    """``metadata.name=x,metadata.namespace!=y``; any dotted path works (a missing field is '')."""
    predicates: list[FieldPredicate] = []
    for term in (text or '').split(','):
        if not term.strip():
            continue
        m = _FIELD_TERM.fullmatch(term)
        if m is None:
            raise bad_request(f'invalid field selector: {term!r}')
        path, op, value = m[1], m[2], m[3]
        if op == '!=':
            predicates.append(lambda body, p=path, v=value: _field_value(body, p) != v)
        else:
            predicates.append(lambda body, p=path, v=value: _field_value(body, p) == v)
    return predicates


def _field_value(body: Body, path: str) -> str:
    value: Any = body
    for part in path.split('.'):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def label_selector_to_string(selector: Any) -> str:
    """A LabelSelector (matchLabels/matchExpressions) as its string form, e.g. for `/scale`."""
    if not isinstance(selector, dict):
        return ''
    terms = [f'{k}={v}' for k, v in sorted((selector.get('matchLabels') or {}).items())]
    for expr in selector.get('matchExpressions') or []:
        key, op, values = expr.get('key'), expr.get('operator'), expr.get('values') or []
        if op == 'In':
            terms.append(f'{key} in ({",".join(values)})')
        elif op == 'NotIn':
            terms.append(f'{key} notin ({",".join(values)})')
        elif op == 'Exists':
            terms.append(str(key))
        elif op == 'DoesNotExist':
            terms.append(f'!{key}')
    return ','.join(terms)


def apply_schema_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    """Fill in OpenAPI v3 ``default``s in place, as the API server does for custom resources."""
    if isinstance(value, dict):
        properties = schema.get('properties') or {}
        for name, subschema in properties.items():
            if name not in value and isinstance(subschema, dict) and 'default' in subschema:
                value[name] = copy.deepcopy(subschema['default'])
            if name in value and isinstance(subschema, dict):
                apply_schema_defaults(value[name], subschema)
        additional = schema.get('additionalProperties')
        if isinstance(additional, dict):
            for name, item in value.items():
                if name not in properties:
                    apply_schema_defaults(item, additional)
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        for item in value:
            apply_schema_defaults(item, schema['items'])


def _wants_table(request: rendering.Request) -> bool:
    """kubectl get asks for a server-side Table (Accept: application/json;as=Table;...)."""
    accept = next((v for k, v in request.headers.items() if k.lower() == 'accept'), '')
    return 'as=Table' in accept


def _as_table(columns: list[Body], items: list[Body], metadata: Body) -> Body:
    """A meta.k8s.io/v1 Table as the API server renders custom resources: Name, then the CRD's
    printer columns (simple .a.b.c paths), each row carrying the object's metadata."""
    definitions = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                    'description': 'Name must be unique within a namespace.'}]
    definitions += [{'name': c['name'], 'type': c.get('type', 'string'), 'format': c.get('format', ''),
                     'description': c.get('description', ''), 'priority': c.get('priority', 0)} for c in columns]
    rows = [{'cells': [body['metadata']['name'], *(_cell(body, c) for c in columns)],
             'object': {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                        'metadata': body['metadata']}} for body in items]
    return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': metadata,
            'columnDefinitions': definitions, 'rows': rows}


def _cell(body: Body, column: Body) -> Any:
    """One printer column's value; dates as the API server renders them, as an age ("5m")."""
    value = _get_path(body, column['jsonPath'])
    if column.get('type') != 'date' or not isinstance(value, str):
        return value
    try:
        then = datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
    except ValueError:
        return value
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= 2 * size:
            return f'{seconds // size}{unit}'
    return f'{seconds}s'


def _get_path(body: Any, dotted: str) -> Any:
    for part in dotted.strip('.').split('.'):
        body = body.get(part) if isinstance(body, dict) else None
    return body


def _set_path(body: Body, dotted: str, value: Any) -> None:
    *parents, last = dotted.strip('.').split('.')
    for part in parents:
        body = body.setdefault(part, {})
    body[last] = value


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes' version ordering: GA before beta before alpha, higher numbers first."""
    m = re.fullmatch(r'v(\d+)(?:(alpha|beta)(\d+))?', version)
    if m is None:
        return (0, 0, 0)  # non-conventional versions go last
    stability = {'alpha': 1, 'beta': 2}.get(m[2] or '', 3)
    return (stability, int(m[1]), int(m[3] or 0))


@functools.cache
def _bundled_resources() -> bytes:
    data = importlib.resources.files('kmock._internal').joinpath('resources.json.gz').read_bytes()
    return gzip.decompress(data)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _content_type(request: rendering.Request) -> str:
    header = next((v for k, v in request.headers.items() if k.lower() == 'content-type'), '')
    return header.split(';', 1)[0].strip().lower()


def _api_version(resource: kmock.resource) -> str:
    return f'{resource.group}/{resource.version}' if resource.group else str(resource.version)


# --------------------------------------------------------------------------------------------------
# The emulator.
# --------------------------------------------------------------------------------------------------

_F = TypeVar('_F', bound=Callable[..., Any])


def _in_server_loop(fn: _F) -> _F:
    """
    Run a state-touching method in the server's event loop when called from another thread.

    The state is only ever touched from the loop's thread, so synchronous tests can call
    these methods while the server runs in a background thread.
    """
    @functools.wraps(fn)
    def wrapper(self: EmulatedApiServer, *args: Any, **kwargs: Any) -> Any:
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or loop.is_closed() or not loop.is_running() or current is loop:
            return fn(self, *args, **kwargs)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(self, *args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=30)
    return wrapper  # type: ignore[return-value]


@attrs.define(kw_only=True)
class EmulatedApiServer(kmock.KubernetesEmulator):
    """
    kmock's emulator with the server-side behaviour of a real Kubernetes API server.

    Public methods are safe to call from any thread (they hop into the server's loop).
    ``server.objects`` (from kmock) holds every object and its history; read it from
    the loop's thread only (see `call`), or use `get_object`/`list_objects` from other threads.
    """

    bundled_resources: bool = True  # load kmock's bundled K3s resource list for discovery
    bookmark_interval: float = 10.0  # seconds between BOOKMARKs on idle watches that allow them
    max_events: int = 100_000  # watch history; older resourceVersions answer 410 Gone
    max_history: int = 100  # versions kept per object in `server.objects[...].history`
    max_requests: int | None = None  # requests kept in `server.requests`/views; None: all

    _rv: int = attrs.field(default=0, init=False)
    _events: list[WatchEvent] = attrs.field(factory=list, init=False)
    _event_rvs: list[int] = attrs.field(factory=list, init=False)
    _oldest_watchable_rv: int = attrs.field(default=0, init=False)
    _wakeup: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    _schemas: dict[kmock.resource, Mapping[str, Any]] = attrs.field(factory=dict, init=False)
    _scale_paths: dict[kmock.resource, ScalePaths] = attrs.field(factory=lambda: dict(BUILTIN_SCALE), init=False)
    _crd_resources: dict[str, list[kmock.resource]] = attrs.field(factory=dict, init=False)
    _pending_propagation: dict[str, str] = attrs.field(factory=dict, init=False)
    _unexpected_errors: list[BaseException] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Watch streams are JSON lines (kubectl -w refuses kmock's application/octet-stream).
        (self.fallback ** 1)[kmock.action.WATCH] << kmock.headers({'Content-Type': 'application/json'}) \
            << self._serve_watch
        # The official client asks for /version/, /api/v1/, /apis/, with trailing slashes.
        self.fallback['get', re.compile(r'/version/')] << self._serve_server_version
        self.fallback['get', re.compile(r'/apis/')] << self._serve_apis
        self.fallback['get', re.compile(r'/api/')] << self._serve_api
        if self.bundled_resources:
            # The same data as `self.resources.load_bundled()`, read and unzipped once per process
            # (kmock reads it with a deprecated importlib call, on every server).
            self.resources.load_data(_bundled_resources())
        for name in INITIAL_NAMESPACES:
            self._create(NAMESPACE_RESOURCE, None, {'metadata': {'name': name}})

    # ---------------------------------------------------------------------------------- public API

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def unexpected_errors(self) -> list[BaseException]:
        """Exceptions that became HTTP 500s: bugs of the emulator or of injected reactions."""
        return self._unexpected_errors

    @_in_server_loop
    def register_crd(self, crd: Mapping[str, Any]) -> Body:
        """Create (or replace the spec of) a CustomResourceDefinition from its YAML dict."""
        crd = copy.deepcopy(dict(crd))
        crd.setdefault('apiVersion', 'apiextensions.k8s.io/v1')
        crd.setdefault('kind', 'CustomResourceDefinition')
        name = (crd.get('metadata') or {}).get('name')
        if not name:
            names = (crd.get('spec') or {}).get('names') or {}
            name = f"{names.get('plural')}.{(crd.get('spec') or {}).get('group')}"
            crd.setdefault('metadata', {})['name'] = name
        existing = self._live((CRD_RESOURCE, None, name))
        if existing is None:
            return copy.deepcopy(self._create(CRD_RESOURCE, None, crd))
        self._validate_crd(crd)
        new = copy.deepcopy(existing)
        new['spec'] = crd.get('spec')
        return copy.deepcopy(self._commit(CRD_RESOURCE, (CRD_RESOURCE, None, name), existing, new, None))

    @_in_server_loop
    def create_object(self, body: Mapping[str, Any], *, resource: str | kmock.resource | None = None,
                      namespace: str | None = None) -> Body:
        """Create an object as a POST would (the resource is found by apiVersion+kind if not given)."""
        res = self._resource_for(body) if resource is None else kmock.resource(resource)
        namespace = namespace or (body.get('metadata') or {}).get('namespace')
        return copy.deepcopy(self._create(res, namespace, body))

    @_in_server_loop
    def get_object(self, resource: str | kmock.resource, namespace: str | None, name: str) -> Body | None:
        res = kmock.resource(resource)
        body = self._live(self._key(res, namespace, name))
        return copy.deepcopy(body) if body is not None else None

    @_in_server_loop
    def list_objects(self, resource: str | kmock.resource, namespace: str | None = None, *,
                     label_selector: str | None = None, field_selector: str | None = None) -> list[Body]:
        res = kmock.resource(resource)
        return [copy.deepcopy(body) for _, body in self._select(res, namespace, None, label_selector, field_selector)]

    @_in_server_loop
    def patch_object(self, resource: str | kmock.resource, namespace: str | None, name: str, patch: Any, *,
                     subresource: str | None = None, content_type: str = MERGE_PATCH) -> Body:
        res = kmock.resource(resource)
        return copy.deepcopy(self._patch(res, namespace, name, subresource, content_type, patch))

    @_in_server_loop
    def delete_object(self, resource: str | kmock.resource, namespace: str | None, name: str, *,
                      propagation_policy: str | None = None) -> Body:
        res = kmock.resource(resource)
        return copy.deepcopy(self._delete(res, namespace, name, {'propagationPolicy': propagation_policy}))

    @_in_server_loop
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the server's loop (e.g. to read ``server.objects``)."""
        return fn(*args, **kwargs)

    def close_watches(self) -> None:
        """End all watch streams (at shutdown, so that the HTTP server stops at once)."""
        self._closing = True
        self._wake()

    # ------------------------------------------------------------------------ kmock integration

    async def __aenter__(self) -> EmulatedApiServer:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        await super().__aenter__()
        return self

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Re-implements RawHandler.__call__ only to parse requests with `parse_k8s_path`:
        # kmock 0.8 fails on /api/v1/namespaces before any hook could intervene.
        # It also keeps expected API errors (404, 409, 422...) out of the error list,
        # so that `unexpected_errors` holds only real failures (HTTP 500s).
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            if self.max_requests is not None and len(self._requests) > self.max_requests:
                del self._requests[:len(self._requests) - self.max_requests // 2]
            try:
                return await self._handle(request)
            except rendering.StreamingError as e:
                raw_response = e.args[0]
                if e.__cause__ is not None:
                    raise e.__cause__ from None
                raise
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away; aiohttp deals with it
        except Exception as e:
            if not isinstance(e, kmock.KubernetesError):
                logger.exception(f'Emulated API server failed on {raw_request.method} {raw_request.path_qs}')
                self._unexpected_errors.append(e)
                if self._errors:
                    self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            with contextlib.suppress(ConnectionError):
                await self._stream_error(e, raw_response)
                await raw_response.write_eof()
            return raw_response

    async def _parse_request(self, raw_request: aiohttp.web.BaseRequest, *, id: int) -> rendering.Request:
        # Mirrors kmock's Request._parse, with our path parser, YAML bodies, and actions for
        # PUT (update) and collection DELETE, which kmock leaves without an action.
        body = await raw_request.read()
        text = body.decode('utf-8', errors='replace')
        data: Any = None
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                if 'yaml' in (raw_request.content_type or ''):
                    with contextlib.suppress(yaml.YAMLError):
                        data = yaml.safe_load(text)
        k8s = parse_k8s_path(raw_request.path)
        resource = None if k8s.group is None else kmock.resource(
            group=k8s.group, version=k8s.version, plural=k8s.plural)
        method = kmock.method(raw_request.method)
        action = parsing.guess_k8s(k8s, method, dict(raw_request.query))
        if action is None and k8s.plural is not None:
            if method == kmock.method.PUT and k8s.name is not None:
                action = kmock.action.UPDATE
            elif method == kmock.method.DELETE:
                action = kmock.action.DELETE
        return rendering.Request(
            id=id, raw_request=raw_request, url=raw_request.url, method=raw_request.method,
            params=dict(raw_request.query), headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies), data=data, body=body, text=text,
            action=action, resource=resource, namespace=k8s.namespace,
            name=k8s.name, subresource=k8s.subresource,
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # Skips KubernetesEmulator._handle, which applies writes naively (plain dict merges,
        # no metadata) before the reactions run. Here, writes happen in the fallbacks below.
        return await apps.RawHandler._handle(self, request)

    def _get_resources(self) -> list[references.resource]:
        # kmock also counts soft-deleted objects' resources, which would keep a deleted CRD's
        # resource discoverable. Only declared resources and live objects count here.
        result = set(kmock.KubernetesScaffold._get_resources(self))
        result.update(resource for (resource, _, _), obj in self._objects.items() if not obj.deleted)
        return list(result)

    async def _serve_apis(self, request: rendering.Request) -> Body:
        # Re-implemented to order versions by Kubernetes' priority; kmock picks an arbitrary
        # "preferred" version from a set, and kopf watches the preferred one.
        groups = self._group_versions()
        return {'apiVersion': 'v1', 'kind': 'APIGroupList',
                'groups': [self._render_group(group, versions) for group, versions in sorted(groups.items())]}

    async def _serve_group(self, request: rendering.Request) -> Body:
        assert request.resource is not None
        groups = self._group_versions()
        if request.resource.group not in groups:
            raise kmock.KubernetesResourceNotFoundError()
        return {'apiVersion': 'v1', 'kind': 'APIGroup',
                **self._render_group(request.resource.group, groups[request.resource.group])}

    async def _serve_version(self, request: rendering.Request) -> Body:
        # Re-implemented for kubectl: kmock gives subresources their parent's short names
        # (kubectl then refuses `kubectl get ns`) and the core group a groupVersion of "/v1".
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        resources = sorted((res for res in self._get_resources()
                            if res.plural and res.group == group and res.version == version),
                           key=lambda res: str(res.plural))
        if not resources and group != '':
            raise kmock.KubernetesResourceNotFoundError()
        entries: list[Body] = []
        for res in resources:
            info = self._info(res)
            namespaced = info.namespaced if info.namespaced is not None else True
            entries.append({
                'name': res.plural, 'singularName': info.singular or str(res.plural).rstrip('s'),
                'namespaced': namespaced, 'kind': info.kind or str(res.plural).capitalize(),
                'verbs': sorted(info.verbs or ALL_VERBS),
                **({'shortNames': sorted(info.shortnames)} if info.shortnames else {}),
                **({'categories': sorted(info.categories)} if info.categories else {}),
            })
            for sub in sorted(info.subresources):
                entries.append({
                    'name': f'{res.plural}/{sub}', 'singularName': '', 'namespaced': namespaced,
                    'kind': 'Scale' if sub == 'scale' else info.kind or str(res.plural).capitalize(),
                    'verbs': ['get', 'patch', 'update'],
                    **({'group': 'autoscaling', 'version': 'v1'} if sub == 'scale' else {}),
                })
        return {'apiVersion': 'v1', 'kind': 'APIResourceList',
                'groupVersion': f'{group}/{version}' if group else str(version), 'resources': entries}

    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for res in self._get_resources():
            if res.group and res.version and res.plural:
                groups.setdefault(res.group, set()).add(res.version)
        return {g: sorted(vs, key=_version_priority, reverse=True) for g, vs in groups.items()}

    @staticmethod
    def _render_group(group: str, versions: list[str]) -> Body:
        return {
            'name': group,
            'versions': [{'groupVersion': f'{group}/{v}', 'version': v} for v in versions],
            'preferredVersion': {'groupVersion': f'{group}/{versions[0]}', 'version': versions[0]},
        }

    # ------------------------------------------------------------------------- fallback reactions

    async def _serve_list(self, request: rendering.Request) -> Body:
        if request.resource is not None and request.resource.plural is None:  # /api/v1/, /apis/g/v/
            if request.resource.version is None:
                return await self._serve_group(request)
            return await self._serve_version(request)
        resource = self._known(request.resource)
        info = self._info(resource)
        selected = self._select(resource, request.namespace, None,
                                request.params.get('labelSelector'), request.params.get('fieldSelector'))
        items = [body for _, body in selected]
        metadata: Body = {'resourceVersion': str(self._rv)}
        limit = int(request.params.get('limit') or 0)
        offset = int(request.params.get('continue') or 0)
        if limit > 0:
            remaining = len(items) - offset - limit
            items = items[offset:offset + limit]
            metadata['continue'] = str(offset + limit) if remaining > 0 else ''
            if remaining > 0:
                metadata['remainingItemCount'] = remaining
        columns = self._printer_columns(resource) if _wants_table(request) else None
        if columns is not None:
            return _as_table(columns, items, metadata)
        return {'apiVersion': _api_version(resource), 'kind': f'{info.kind or "Unknown"}List',
                'metadata': metadata, 'items': items}

    async def _serve_fetch(self, request: rendering.Request) -> Body:
        resource = self._known(request.resource)
        assert request.name is not None
        body = self._live(self._key(resource, request.namespace, request.name))
        if body is None:
            raise not_found(resource, request.name)
        if request.subresource == 'scale':
            return self._scale_view(resource, body)
        if request.subresource not in (None, 'status'):
            raise not_found(resource, request.name)
        columns = self._printer_columns(resource) if _wants_table(request) else None
        if columns is not None:
            return _as_table(columns, [body], {'resourceVersion': body['metadata'].get('resourceVersion', '')})
        return body

    def _printer_columns(self, resource: kmock.resource) -> list[Body] | None:
        """A custom resource's additionalPrinterColumns (None for built-in kinds: no Table for them)."""
        for (kind, _, _), crd in self._live_items():
            spec = crd.get('spec') or {} if kind == CRD_RESOURCE else {}
            if spec.get('group') != resource.group or (spec.get('names') or {}).get('plural') != resource.plural:
                continue
            for version in spec.get('versions') or []:
                if version.get('name') == resource.version:
                    return version.get('additionalPrinterColumns') or []
        return None

    async def _serve_create(self, request: rendering.Request) -> kmock.Response:
        resource = self._known(request.resource)
        if request.name is not None:
            raise api_error(405, 'MethodNotAllowed', f'POST is not supported on {request.url.path}')
        self._reject_dry_run(request)
        self._require_json(request)
        return kmock.Response(status=201, payload=self._create(resource, request.namespace, request.data))

    async def _serve_update(self, request: rendering.Request) -> Body:
        resource = self._known(request.resource)
        assert request.name is not None
        self._reject_dry_run(request)
        self._require_json(request)
        if request.method == kmock.method.PUT:
            return self._replace(resource, request.namespace, request.name, request.subresource, request.data)
        return self._patch(resource, request.namespace, request.name, request.subresource,
                           _content_type(request), request.data)

    async def _serve_delete(self, request: rendering.Request) -> Body:
        resource = self._known(request.resource)
        self._reject_dry_run(request)
        options = dict(request.data) if isinstance(request.data, dict) else {}
        if 'propagationPolicy' in request.params:
            options['propagationPolicy'] = request.params['propagationPolicy']
        if request.name is None:  # deletecollection
            selected = self._select(resource, request.namespace, None,
                                    request.params.get('labelSelector'), request.params.get('fieldSelector'))
            deleted = [self._delete(resource, key[1], key[2], options) for key, _ in selected]
            info = self._info(resource)
            return {'apiVersion': _api_version(resource), 'kind': f'{info.kind or "Unknown"}List',
                    'metadata': {'resourceVersion': str(self._rv)}, 'items': deleted}
        body = self._delete(resource, request.namespace, request.name, options)
        if self._returns_status_on_delete(resource, body):
            meta = body.get('metadata') or {}
            return {'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Success',
                    'details': {'name': meta.get('name'), 'group': resource.group,
                                'kind': resource.plural, 'uid': meta.get('uid')}}
        return body

    def _returns_status_on_delete(self, resource: kmock.resource, body: Body) -> bool:
        # Built-in resources answer a finished deletion with a Status; pods and custom
        # resources, and anything still held by finalizers, answer with the object.
        if (body.get('metadata') or {}).get('finalizers'):
            return False
        custom = any(resource in resources for resources in self._crd_resources.values())
        return not custom and resource.plural != 'pods'

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        resource = self._known(request.resource)
        params = request.params
        labels = parse_label_selector(params.get('labelSelector'))
        fields = parse_field_selector(params.get('fieldSelector'))
        since = params.get('resourceVersion') or ''
        initial = since in ('', '0') or params.get('sendInitialEvents') == 'true'
        bookmarks = params.get('allowWatchBookmarks') == 'true'
        if not initial and not since.isdigit():
            raise bad_request(f'invalid resourceVersion: {since!r}')
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        info = self._info(resource)

        def matches(body: Body | None) -> bool:
            if body is None:
                return False
            meta = body.get('metadata') or {}
            if request.namespace is not None and meta.get('namespace') != request.namespace:
                return False
            if request.name is not None and meta.get('name') != request.name:
                return False
            return (all(p(meta.get('labels') or {}) for p in labels)
                    and all(p(body) for p in fields))

        def bookmark(rv: int, **annotations: str) -> Body:
            meta: Body = {'resourceVersion': str(rv)}
            if annotations:
                meta['annotations'] = annotations
            return {'type': 'BOOKMARK',
                    'object': {'apiVersion': _api_version(resource), 'kind': info.kind, 'metadata': meta}}

        yield b''  # send the headers now, even if nothing happens for a while

        if initial:
            cursor = self._rv
            snapshot = [body for _, body in self._select(resource, request.namespace, request.name, None, None)]
            for body in snapshot:
                if matches(body):
                    yield {'type': 'ADDED', 'object': body}
            if params.get('sendInitialEvents') == 'true' and bookmarks:
                yield bookmark(cursor, **{'k8s.io/initial-events-end': 'true'})
        else:
            cursor = int(since)
            if cursor < self._oldest_watchable_rv:
                yield {'type': 'ERROR', 'object': {
                    'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure', 'code': 410,
                    'reason': 'Expired', 'message': f'too old resource version: {cursor} ({self._rv})'}}
                return

        last_sent = loop.time()
        while not self._closing:
            wakeup = self._wakeup
            start = bisect.bisect_right(self._event_rvs, cursor)
            pending = self._events[start:]
            cursor = max(cursor, self._rv)  # everything up to now is scanned (no await in between)
            for event in pending:
                if event.resource != resource:
                    continue
                now_matches, old_matched = matches(event.obj), matches(event.old)
                if event.type == 'MODIFIED' and now_matches and not old_matched:
                    kind = 'ADDED'
                elif event.type == 'MODIFIED' and old_matched and not now_matches:
                    kind = 'DELETED'
                elif now_matches:
                    kind = event.type
                else:
                    continue
                yield {'type': kind, 'object': event.obj}
                last_sent = loop.time()
            if pending:
                continue

            now = loop.time()
            if deadline is not None and now >= deadline:
                return
            if bookmarks and now - last_sent >= self.bookmark_interval:
                yield bookmark(cursor)
                last_sent = now
            raw = request._raw_request
            if raw is not None and (raw.transport is None or raw.transport.is_closing()):
                return  # the client is gone
            waits = [self.bookmark_interval if bookmarks else 5.0]
            if deadline is not None:
                waits.append(deadline - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=max(0.0, min(waits)))

    # ---------------------------------------------------------------------------- storage basics

    def _known(self, resource: kmock.resource | None) -> kmock.resource:
        if resource is None or resource.plural is None or resource not in self._get_resources():
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        return resource

    def _info(self, resource: kmock.resource) -> references.ResourceInfo:
        if resource in self._resources:
            return self._resources[resource]
        return references.ResourceInfo()  # implied by a reaction or an object, not declared

    def _is_namespaced(self, resource: kmock.resource, namespace: str | None) -> bool:
        namespaced = self._info(resource).namespaced
        return bool(namespace) if namespaced is None else namespaced

    def _key(self, resource: kmock.resource, namespace: str | None, name: str) -> ObjectKey:
        return (resource, namespace if self._is_namespaced(resource, namespace) else None, name)

    def _live(self, key: ObjectKey) -> Body | None:
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.last.raw

    def _live_items(self) -> Iterator[tuple[ObjectKey, Body]]:
        for key, obj in list(self._objects.items()):
            if not obj.deleted:
                yield key, obj.last.raw

    def _select(self, resource: kmock.resource, namespace: str | None, name: str | None,
                label_selector: str | None, field_selector: str | None) -> list[tuple[ObjectKey, Body]]:
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector)
        result = []
        for key, body in self._live_items():
            res, ns, obj_name = key
            if res != resource or (namespace is not None and ns != namespace):
                continue
            if name is not None and obj_name != name:
                continue
            obj_labels = (body.get('metadata') or {}).get('labels') or {}
            if all(p(obj_labels) for p in labels) and all(p(body) for p in fields):
                result.append((key, body))
        return sorted(result, key=lambda item: (item[0][1] or '', item[0][2]))

    def _resource_for(self, body: Mapping[str, Any]) -> kmock.resource:
        api_version, kind = body.get('apiVersion', ''), body.get('kind')
        group, _, version = api_version.rpartition('/')
        for res, info in self._resources.items():
            if res.group == group and res.version == version and info.kind == kind:
                return res
        raise ValueError(f'No resource is known for apiVersion={api_version!r} kind={kind!r}')

    def _bump(self, body: Body) -> int:
        self._rv += 1
        body.setdefault('metadata', {})['resourceVersion'] = str(self._rv)
        return self._rv

    def _store(self, key: ObjectKey, body: Body) -> None:
        if key in self._objects:
            obj = self._objects[key]
            obj.history.append(body)
            if len(obj.history) > self.max_history:
                del obj.history[:len(obj.history) - self.max_history]
        else:
            self._objects[key] = body

    def _emit(self, type: str, resource: kmock.resource, body: Body, old: Body | None = None) -> None:
        rv = int(body['metadata']['resourceVersion'])
        self._events.append(WatchEvent(rv, resource, type, body, old))
        self._event_rvs.append(rv)
        if len(self._events) > self.max_events:
            drop = len(self._events) - self.max_events // 2
            self._oldest_watchable_rv = self._event_rvs[drop - 1]
            del self._events[:drop], self._event_rvs[:drop]
        self._wake()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    @staticmethod
    def _require_json(request: rendering.Request) -> None:
        content_type = _content_type(request)
        if request.body and request.data is None and 'json' not in content_type and 'yaml' not in content_type:
            # E.g. kubectl sends built-in types as protobuf; only JSON (and YAML) is understood here.
            raise api_error(415, 'UnsupportedMediaType', f'the emulated API server understands JSON bodies, '
                                                          f'not {content_type!r}')

    @staticmethod
    def _reject_dry_run(request: rendering.Request) -> None:
        # Better to refuse than to write what the client asked only to check.
        if request.params.get('dryRun'):
            raise bad_request('dryRun is not supported by the emulated API server')

    # ------------------------------------------------------------------------------------ writes

    def _create(self, resource: kmock.resource, namespace: str | None, body: Any) -> Body:
        info = self._info(resource)
        if not isinstance(body, dict):
            raise bad_request('the request body must be a JSON object')
        body = copy.deepcopy(body)
        meta = body.get('metadata')
        meta = body['metadata'] = dict(meta) if isinstance(meta, dict) else {}

        if self._is_namespaced(resource, namespace or meta.get('namespace')):
            if namespace and meta.get('namespace') and meta['namespace'] != namespace:
                raise bad_request('the namespace of the provided object does not match '
                                  'the namespace sent on the request')
            namespace = namespace or meta.get('namespace')
            if not namespace:
                raise bad_request('a namespace is required for a namespaced resource')
            ns_body = self._live((NAMESPACE_RESOURCE, None, namespace))
            if ns_body is not None and (ns_body.get('metadata') or {}).get('deletionTimestamp'):
                raise api_error(403, 'Forbidden', f'unable to create new content in namespace {namespace} '
                                                  f'because it is being terminated')
            meta['namespace'] = namespace
        else:
            meta.pop('namespace', None)
            namespace = None

        if not meta.get('name'):
            prefix = meta.get('generateName')
            if not prefix:
                raise invalid(resource, None, 'metadata.name: Required value: name or generateName is required')
            for _ in range(100):
                meta['name'] = prefix + ''.join(random.choices(GENERATED_NAME_ALPHABET, k=5))
                if self._live((resource, namespace, meta['name'])) is None:
                    break
        name = meta['name']
        key: ObjectKey = (resource, namespace, name)
        if resource == CRD_RESOURCE:
            self._validate_crd(body)
        if self._live(key) is not None:
            raise api_error(409, 'AlreadyExists', f'{_qualified(resource)} "{name}" already exists',
                            name=name, group=resource.group, kind=resource.plural)

        for field in SERVER_OWNED_METADATA:
            meta.pop(field, None)
        if 'status' in info.subresources:
            body.pop('status', None)  # as the API server does: status is written via /status only
        body = {'apiVersion': _api_version(resource), 'kind': info.kind or body.get('kind'),
                **{k: v for k, v in body.items() if k not in ('apiVersion', 'kind')}}
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        self._normalize_metadata(meta)
        self._apply_defaults(resource, body)
        self._on_create(resource, body)
        self._bump(body)
        self._store(key, body)
        self._emit('ADDED', resource, body)
        if resource == CRD_RESOURCE:
            self._register_crd_resources(body)
        return body

    def _patch(self, resource: kmock.resource, namespace: str | None, name: str, subresource: str | None,
               content_type: str, patch: Any) -> Body:
        key = self._key(resource, namespace, name)
        old = self._live(key)
        if old is None:
            if content_type == APPLY_PATCH and subresource is None and isinstance(patch, dict):
                patch = copy.deepcopy(patch)
                patch.setdefault('metadata', {})['name'] = name
                return self._create(resource, namespace, patch)
            raise not_found(resource, name)
        if subresource not in (None, 'status', 'scale'):
            raise not_found(resource, name)

        base = self._scale_view(resource, old) if subresource == 'scale' else copy.deepcopy(old)
        if content_type == JSON_PATCH:
            if not isinstance(patch, list):
                raise bad_request('a JSON patch must be a list of operations')
            try:
                new = jsonpatch.apply_patch(base, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                # Incl. a failed `test` op: Kubernetes answers 422, and kopf relies on it.
                raise invalid(resource, name, f'the server rejected our request due to an error '
                                              f'in our request: {e}') from None
        elif content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH, 'application/json'):
            if not isinstance(patch, dict):
                raise bad_request('a merge patch must be a JSON object')
            merge = json_merge_patch if content_type == MERGE_PATCH else strategic_merge_patch
            new = merge(base, patch)
            # Merge patches that carry a resourceVersion are conditional, as in Kubernetes.
            wanted_rv = (patch.get('metadata') or {}).get('resourceVersion')
            if wanted_rv is not None and wanted_rv != (base.get('metadata') or {}).get('resourceVersion'):
                raise conflict(resource, name)
        else:
            raise api_error(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format: '
                                                          f'accepted media types include: {JSON_PATCH}, '
                                                          f'{MERGE_PATCH}, {STRATEGIC_MERGE_PATCH}, {APPLY_PATCH}')
        if not isinstance(new, dict):
            raise invalid(resource, name, 'the patched object is not a JSON object')
        if subresource == 'scale':
            return self._update_scale(resource, key, old, new)
        return self._commit(resource, key, old, new, subresource)

    def _replace(self, resource: kmock.resource, namespace: str | None, name: str, subresource: str | None,
                 body: Any) -> Body:
        key = self._key(resource, namespace, name)
        old = self._live(key)
        if old is None:
            raise not_found(resource, name)
        if subresource not in (None, 'status', 'scale'):
            raise not_found(resource, name)
        if not isinstance(body, dict):
            raise bad_request('the request body must be a JSON object')
        meta = body.get('metadata') if isinstance(body.get('metadata'), dict) else {}
        if meta.get('name') and meta['name'] != name:
            raise bad_request('the name of the object does not match the name on the URL')
        wanted_rv = meta.get('resourceVersion')
        if wanted_rv and wanted_rv != (old.get('metadata') or {}).get('resourceVersion'):
            raise conflict(resource, name)
        if subresource == 'scale':
            return self._update_scale(resource, key, old, body)
        return self._commit(resource, key, old, copy.deepcopy(body), subresource)

    def _commit(self, resource: kmock.resource, key: ObjectKey, old: Body, new: Body,
                subresource: str | None) -> Body:
        """Store an update: keep server-owned fields, split status, bump versions, notify."""
        info = self._info(resource)
        old_meta = old.get('metadata') or {}
        if subresource == 'status':
            # The status endpoint changes the status only.
            status = new.get('status')
            new = {k: v for k, v in copy.deepcopy(old).items() if k != 'status'}
            if status is not None:
                new['status'] = status
        elif 'status' in info.subresources:
            # The main endpoint ignores the status when there is a status subresource.
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
            else:
                new.pop('status', None)

        meta = new.get('metadata')
        meta = new['metadata'] = dict(meta) if isinstance(meta, dict) else {}
        for field in IMMUTABLE_METADATA:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        meta.pop('managedFields', None)
        meta['resourceVersion'] = old_meta.get('resourceVersion')
        new['apiVersion'], new['kind'] = old.get('apiVersion'), old.get('kind')
        self._normalize_metadata(meta)
        self._apply_defaults(resource, new)

        if old_meta.get('deletionTimestamp'):
            added = set(meta.get('finalizers') or []) - set(old_meta.get('finalizers') or [])
            if added:
                raise invalid(resource, key[2], f'metadata.finalizers: Forbidden: no new finalizers can be added '
                                                f'if the object is being deleted, found new finalizers {sorted(added)}')
        if new == old:
            return old  # a no-op write changes nothing, as in Kubernetes: no new version, no event

        def spec_of(body: Body) -> Body:
            return {k: v for k, v in body.items() if k not in ('metadata', 'status', 'apiVersion', 'kind')}
        if spec_of(new) != spec_of(old):
            meta['generation'] = int(old_meta.get('generation') or 0) + 1

        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            return self._remove(resource, key, new)

        self._bump(new)
        self._store(key, new)
        self._emit('MODIFIED', resource, new, old)
        if resource == CRD_RESOURCE:
            self._register_crd_resources(new)
        return new

    def _delete(self, resource: kmock.resource, namespace: str | None, name: str, options: Mapping[str, Any]) -> Body:
        key = self._key(resource, namespace, name)
        current = self._live(key)
        if current is None:
            raise not_found(resource, name)
        meta = current.get('metadata') or {}
        preconditions = options.get('preconditions') or {}
        if preconditions.get('uid') and preconditions['uid'] != meta.get('uid'):
            raise conflict(resource, name)
        if preconditions.get('resourceVersion') and preconditions['resourceVersion'] != meta.get('resourceVersion'):
            raise conflict(resource, name)
        policy = options.get('propagationPolicy') or 'Background'
        if policy not in ('Background', 'Foreground', 'Orphan'):
            raise bad_request(f'unsupported propagationPolicy: {policy!r}')
        if meta.get('deletionTimestamp'):
            return current  # already being deleted

        self._pending_propagation[meta['uid']] = policy
        if resource == NAMESPACE_RESOURCE:
            return self._delete_namespace(key, current)
        if meta.get('finalizers'):
            new = copy.deepcopy(current)
            new['metadata'].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                   generation=int(meta.get('generation') or 0) + 1)
            self._bump(new)
            self._store(key, new)
            self._emit('MODIFIED', resource, new, current)
            return new
        return self._remove(resource, key, current)

    def _remove(self, resource: kmock.resource, key: ObjectKey, last: Body) -> Body:
        """Finally remove an object (no finalizers left) and collect what it owned."""
        final = copy.deepcopy(last)
        self._bump(final)
        obj = self._objects[key]
        obj.history.append(final)
        obj.delete()
        self._emit('DELETED', resource, final, last)

        uid = final['metadata'].get('uid')
        policy = self._pending_propagation.pop(uid, 'Background')
        if resource == CRD_RESOURCE:
            self._unregister_crd_resources(key[2])
        self._collect_garbage(uid, orphan=policy == 'Orphan')
        namespace = key[1]
        if namespace is not None:
            self._finish_namespace_if_empty(namespace)
        return final

    def _collect_garbage(self, owner_uid: str, *, orphan: bool) -> None:
        """
        The garbage collector, synchronously: dependents lose the reference to a deleted owner;
        those left with no existing owner are deleted (unless orphaned), recursively.
        """
        live = list(self._live_items())
        existing_uids = {(body.get('metadata') or {}).get('uid') for _, body in live}
        for key, body in live:
            refs = (body.get('metadata') or {}).get('ownerReferences') or []
            if not any(ref.get('uid') == owner_uid for ref in refs):
                continue
            current = self._live(key)  # may have changed during this very collection
            if current is None:
                continue
            remaining = [ref for ref in refs if ref.get('uid') != owner_uid and ref.get('uid') in existing_uids]
            if orphan or remaining:
                new = copy.deepcopy(current)
                new['metadata']['ownerReferences'] = [ref for ref in refs if ref.get('uid') != owner_uid]
                self._commit(key[0], key, current, new, None)
            elif not (current.get('metadata') or {}).get('deletionTimestamp'):
                self._delete(key[0], key[1], key[2], {'propagationPolicy': 'Background'})

    def _delete_namespace(self, key: ObjectKey, current: Body) -> Body:
        new = copy.deepcopy(current)
        new['metadata']['deletionTimestamp'] = _now()
        new.setdefault('status', {})['phase'] = 'Terminating'
        self._bump(new)
        self._store(key, new)
        self._emit('MODIFIED', NAMESPACE_RESOURCE, new, current)
        for obj_key, _ in list(self._live_items()):
            if obj_key[1] == key[2] and self._live(obj_key) is not None:
                body = self._live(obj_key) or {}
                if not (body.get('metadata') or {}).get('deletionTimestamp'):
                    self._delete(obj_key[0], obj_key[1], obj_key[2], {})
        self._finish_namespace_if_empty(key[2])
        return self._live(key) or new

    def _finish_namespace_if_empty(self, namespace: str) -> None:
        key: ObjectKey = (NAMESPACE_RESOURCE, None, namespace)
        body = self._live(key)
        meta = (body or {}).get('metadata') or {}
        if body is None or not meta.get('deletionTimestamp') or meta.get('finalizers'):
            return
        if any(obj_key[1] == namespace for obj_key, _ in self._live_items()):
            return
        self._remove(NAMESPACE_RESOURCE, key, body)

    # ------------------------------------------------------------------------------ specialities

    @staticmethod
    def _normalize_metadata(meta: Body) -> None:
        for field in OMITTED_WHEN_EMPTY:
            if field in meta and not meta[field]:
                del meta[field]

    def _apply_defaults(self, resource: kmock.resource, body: Body) -> None:
        if resource in BUILTIN_SCALE and isinstance(body.get('spec'), dict):
            body['spec'].setdefault('replicas', 1)
        schema = self._schemas.get(resource)
        if schema is not None:
            # The root metadata is the server's business, not the schema's.
            properties = {k: v for k, v in (schema.get('properties') or {}).items() if k != 'metadata'}
            apply_schema_defaults(body, {**schema, 'properties': properties})

    def _on_create(self, resource: kmock.resource, body: Body) -> None:
        """Fields that controllers of a real cluster would set right after creation."""
        if resource == NAMESPACE_RESOURCE:
            name = body['metadata']['name']
            body['metadata'].setdefault('labels', {})['kubernetes.io/metadata.name'] = name
            body['spec'] = {'finalizers': ['kubernetes']}
            body['status'] = {'phase': 'Active'}
        elif resource == CRD_RESOURCE:
            spec = body.get('spec') or {}
            versions = spec.get('versions') or []
            storage = [v['name'] for v in versions if v.get('storage')] or [v['name'] for v in versions[:1]]
            now = _now()
            body['status'] = {
                'acceptedNames': spec.get('names') or {},
                'storedVersions': storage,
                'conditions': [
                    {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                     'message': 'no conflicts found', 'lastTransitionTime': now},
                    {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                     'message': 'the initial names have been accepted', 'lastTransitionTime': now},
                ],
            }

    @staticmethod
    def _validate_crd(crd: Body) -> None:
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        if not spec.get('group') or not names.get('plural') or not names.get('kind'):
            raise invalid(CRD_RESOURCE, crd['metadata'].get('name'),
                          'spec.group, spec.names.plural, spec.names.kind are required')

    def _register_crd_resources(self, crd: Body) -> None:
        name = crd['metadata']['name']
        spec = crd.get('spec') or {}
        group, names = spec['group'], spec['names']
        plural, kind = names['plural'], names['kind']
        versions = spec.get('versions') or ([{'name': spec['version'], 'served': True}] if spec.get('version') else [])
        self._unregister_crd_resources(name, keep_objects=True)
        registered = []
        for version in versions:
            if not version.get('served', True):
                continue
            resource = kmock.resource(group, version['name'], plural)
            subresources = version.get('subresources') or spec.get('subresources') or {}
            self._resources[resource] = references.ResourceInfo(
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
                kind=kind,
                singular=names.get('singular') or kind.lower(),
                verbs=set(ALL_VERBS),
                shortnames=set(names.get('shortNames') or []),
                categories=set(names.get('categories') or []),
                subresources={s for s in ('status', 'scale') if s in subresources},
            )
            if 'scale' in subresources:
                scale = subresources['scale'] or {}
                self._scale_paths[resource] = ScalePaths(
                    spec_replicas=scale.get('specReplicasPath', '.spec.replicas'),
                    status_replicas=scale.get('statusReplicasPath', '.status.replicas'),
                    label_selector=scale.get('labelSelectorPath'),
                )
            schema = (version.get('schema') or {}).get('openAPIV3Schema') \
                or (spec.get('validation') or {}).get('openAPIV3Schema')
            if schema:
                self._schemas[resource] = schema
            registered.append(resource)
        self._crd_resources[name] = registered

    def _unregister_crd_resources(self, crd_name: str, *, keep_objects: bool = False) -> None:
        for resource in self._crd_resources.pop(crd_name, []):
            if not keep_objects:
                for key, body in list(self._live_items()):
                    if key[0] == resource:
                        self._remove(resource, key, body)
            self._resources.pop(resource, None)
            self._schemas.pop(resource, None)
            self._scale_paths.pop(resource, None)

    def _scale_view(self, resource: kmock.resource, body: Body) -> Body:
        paths = self._scale_paths.get(resource)
        meta = body.get('metadata') or {}
        if paths is None:
            raise not_found(resource, meta.get('name', ''))
        if paths.label_selector is None:
            selector = label_selector_to_string(_get_path(body, '.spec.selector'))
        else:
            selector = _get_path(body, paths.label_selector) or ''
        return {
            'apiVersion': 'autoscaling/v1',
            'kind': 'Scale',
            'metadata': {k: meta[k] for k in ('name', 'namespace', 'uid', 'resourceVersion', 'creationTimestamp')
                         if k in meta},
            'spec': {'replicas': _get_path(body, paths.spec_replicas) or 0},
            'status': {'replicas': _get_path(body, paths.status_replicas) or 0, 'selector': selector},
        }

    def _update_scale(self, resource: kmock.resource, key: ObjectKey, old: Body, scale: Body) -> Body:
        replicas = (scale.get('spec') or {}).get('replicas')
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(resource, key[2], f'spec.replicas: Invalid value: {replicas!r}')
        new = copy.deepcopy(old)
        _set_path(new, self._scale_paths[resource].spec_replicas, replicas)
        return self._scale_view(resource, self._commit(resource, key, old, new, None))


# --------------------------------------------------------------------------------------------------
# Serving: in a background thread (for pytest), or as a process.
# --------------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serve(server: EmulatedApiServer, host: str = '127.0.0.1', port: int = 0) -> AsyncIterator[str]:
    """Serve the emulator over HTTP in the current loop; yields the base URL."""
    async with server:
        web_server = aiohttp.web.Server(server, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(web_server, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = aiohttp.web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            actual_port = runner.addresses[0][1]
            yield f'http://{host}:{actual_port}'
        finally:
            server.close_watches()
            await runner.cleanup()


class ApiServerThread:
    """
    The emulator running in its own thread and event loop, for synchronous tests.

    ``url``, ``port``, ``kubeconfig_path`` (written on start if a path is given),
    ``server`` (the `EmulatedApiServer`, for assertions), ``env`` (``KUBECONFIG``),
    ``api_client()`` (an official client's ApiClient pointed at the server), and
    ``as_default_kubeconfig()`` (for code that loads the default kubeconfig, e.g. kopf).
    """

    def __init__(self, server: EmulatedApiServer | None = None, *, host: str = '127.0.0.1', port: int = 0,
                 kubeconfig_path: str | pathlib.Path | None = None,
                 crds: Iterable[Mapping[str, Any]] = ()) -> None:
        self.server = server if server is not None else EmulatedApiServer()
        self.host = host
        self.port = port
        self.url = ''
        self.kubeconfig_path = pathlib.Path(kubeconfig_path) if kubeconfig_path is not None else None
        for crd in crds:
            self.server.register_crd(crd)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def env(self) -> dict[str, str]:
        return {'KUBECONFIG': str(self.kubeconfig_path)} if self.kubeconfig_path is not None else {}

    def register_crd(self, crd: Mapping[str, Any]) -> Body:
        return self.server.register_crd(crd)

    def api_client(self) -> Any:
        import kubernetes.client
        return kubernetes.client.ApiClient(client_configuration(self.url))

    @contextlib.contextmanager
    def as_default_kubeconfig(self) -> Iterator[pathlib.Path]:
        """
        Make this server the default cluster of code that loads the default kubeconfig,
        e.g. ``kubernetes.config.load_kube_config()`` and kopf's ``login_via_client``.

        Setting $KUBECONFIG alone is not enough in a test process: the official client reads
        it once, when imported, into ``kube_config.KUBE_CONFIG_DEFAULT_LOCATION``.
        """
        import kubernetes.config.kube_config as kube_config
        if self.kubeconfig_path is None:
            raise RuntimeError('The server was started without a kubeconfig_path.')
        saved_env, saved_default = os.environ.get('KUBECONFIG'), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        os.environ['KUBECONFIG'] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(self.kubeconfig_path)
        try:
            yield self.kubeconfig_path
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_default
            if saved_env is None:
                os.environ.pop('KUBECONFIG', None)
            else:
                os.environ['KUBECONFIG'] = saved_env

    def start(self) -> ApiServerThread:
        self._thread = threading.Thread(target=self._run, name='emulated-apiserver', daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError('The emulated API server did not start in 30 seconds.')
        if self._failure is not None:
            raise RuntimeError('The emulated API server failed to start.') from self._failure
        if self.kubeconfig_path is not None:
            write_kubeconfig(self.kubeconfig_path, self.url)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> ApiServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:
            self._failure = e
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self.server, self.host, self.port) as url:
            self.url = url
            self.port = int(url.rsplit(':', 1)[1])
            self._ready.set()
            await self._stop.wait()


def load_crds(path: str | pathlib.Path) -> list[Body]:
    """All CustomResourceDefinitions in a (multi-document) YAML file."""
    docs = yaml.safe_load_all(pathlib.Path(path).read_text(encoding='utf-8'))
    return [doc for doc in docs if isinstance(doc, dict) and doc.get('kind') == 'CustomResourceDefinition']


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m tests.testbed.apiserver',
                                     description='Serve an emulated, in-memory Kubernetes API over HTTP.')
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0, help='0 picks a free port (see the printed URL)')
    parser.add_argument('--crd', action='append', default=[], type=pathlib.Path, metavar='FILE',
                        help='register the CRDs in this YAML file (repeatable)')
    parser.add_argument('--kubeconfig', type=pathlib.Path, metavar='FILE',
                        help='write a kubeconfig pointing at the server to this file')
    parser.add_argument('--verbose', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    server = EmulatedApiServer(max_requests=10_000)
    for path in args.crd:
        for crd in load_crds(path):
            server.register_crd(crd)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with serve(server, args.host, args.port) as url:
            if args.kubeconfig is not None:
                write_kubeconfig(args.kubeconfig, url)
            print(f'Serving the emulated Kubernetes API at {url}', flush=True)
            await stop.wait()

    asyncio.run(run())


if __name__ == '__main__':
    main()
