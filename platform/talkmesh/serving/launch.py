"""``talkmesh serve``: run the Serve application of a Serve config file on a loopback Ray.

    talkmesh serve --config serve/config.yaml [method=faceformer style_dir=/srv/styles ...]

Reads the Serve config (``http_options`` + the first application's ``import_path`` and
``args``), applies ``key=value`` overrides to the args (validated as
:class:`talkmesh.serving.settings.ServeConfig`), attaches to ``RAY_ADDRESS`` or starts a local
Ray bound to 127.0.0.1, starts Serve's HTTP proxy on the configured host/port and deploys
the application; it runs until interrupted (Ctrl-C or SIGTERM), then shuts Serve (and the
Ray it started) down: the model replicas hand their running adaptation jobs back to the queue.
"""

from __future__ import annotations

import importlib
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from talkmesh.config import ConfigError, parse_override, yaml_load

__all__ = ["deployment_sections", "read_serve_file", "run_serve"]


def read_serve_file(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The Serve config file as a dict, with ``key=value`` overrides applied to the first
    application's ``args`` and the args validated (errors name the file and key)."""
    from talkmesh.serving.settings import load_serve_config

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {p} not found")
    doc = yaml_load(p.read_text()) or {}
    apps = doc.get("applications")
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], Mapping):
        raise ConfigError(f"{p}: 'applications' must list at least one application")
    app = dict(apps[0])
    if "import_path" not in app:
        raise ConfigError(f"{p}: applications[0].import_path is missing")
    args = dict(app.get("args") or {})
    for o in overrides:
        key, value = parse_override(o)
        args[key] = value
    try:
        load_serve_config(args)
    except ConfigError as e:
        raise ConfigError(f"{p}: applications[0].args: {e}") from None
    app["args"] = args
    try:
        deployment_sections(app)
    except ConfigError as e:
        raise ConfigError(f"{p}: applications[0].{e}") from None
    doc["applications"] = [app, *apps[1:]]
    return doc


def deployment_sections(app: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """An application's ``deployments`` list (Serve config file format: ``- name: StyleModel``
    plus options) as checked options per deployment name (:func:`deployment_options`)."""
    from talkmesh.serving.settings import deployment_options

    sections = app.get("deployments") or []
    if not isinstance(sections, list) or not all(isinstance(d, Mapping) and "name" in d for d in sections):
        raise ConfigError("deployments: must be a list of {name: StyleModel|Ingress, <option>: ...}")
    return deployment_options({str(d["name"]): {k: v for k, v in d.items() if k != "name"} for d in sections})


def run_serve(path: str | Path, overrides: Sequence[str] = (), *, blocking: bool = True) -> dict[str, Any]:
    """Deploy the first application of the Serve config file; see the module docstring.
    Returns {"url", "name"}; with ``blocking`` it only returns after Ctrl-C."""
    from talkmesh.ops.jobs import connect_ray

    doc = read_serve_file(path, overrides)
    app = doc["applications"][0]
    http = dict(doc.get("http_options") or {})
    host, port = str(http.get("host", "127.0.0.1")), int(http.get("port", 8000))
    started = connect_ray(1)
    from ray import serve

    try:
        serve.start(
            http_options={
                "host": host,
                "port": port,
                **{k: v for k, v in http.items() if k in ("request_timeout_s", "keep_alive_timeout_s")},
            }
        )
        module, _, attr = str(app["import_path"]).partition(":")
        builder = getattr(importlib.import_module(module), attr)
        name = str(app.get("name", "talkmesh"))
        if app.get("deployments"):  # the builder's variant that takes them (serve deploy applies them itself)
            with_deployments = getattr(importlib.import_module(module), f"{attr}_with_deployments", None)
            if with_deployments is None:
                raise ConfigError(f"{app['import_path']}: no {attr}_with_deployments to apply the deployments section")
            built = with_deployments(app["args"], deployment_sections(app))
        else:
            built = builder(app["args"])
        serve.run(built, name=name, route_prefix=str(app.get("route_prefix", "/")))
        url = f"http://{host}:{port}"
        print(f"talkmesh serve: {name} at {url}  (docs {url}/docs; Ctrl-C stops)", flush=True)
        if not blocking:
            return {"url": url, "name": name}
        _stop_on_sigterm()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return {"url": f"http://{host}:{port}", "name": str(app.get("name", "talkmesh"))}
    finally:
        if blocking:
            serve.shutdown()
            if started:
                import ray

                ray.shutdown()


def _stop_on_sigterm() -> None:
    """SIGTERM (a process manager stopping the service) shuts down like Ctrl-C does."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
