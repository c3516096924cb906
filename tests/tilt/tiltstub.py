"""Tilt's builtins, stubbed, for evaluating the Tiltfile with starlark-pyo3 (no Tilt here).

Every call is recorded. The stubs do what Tilt does where the answer matters: paths resolve
against the directory of the Tiltfile that names them (an ``include``d file's own directory),
``helm()`` really renders the chart with the Helm CLI of the chart tests and the arguments Tilt
passes (``helm template NAME CHART --namespace NS --include-crds --values F... --set S...``),
then drops the test hooks and sets the namespace of objects without one, as Tilt does;
``local()`` answers only the Docker probe, as told.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import starlark as sl
import yaml

from tests.chart.chart import helm as helm_binary

PRELUDE = "os = struct(getenv = _os_getenv)\n"


@dataclass
class Call:
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    cwd: Path  # the directory of the Tiltfile that made the call


@dataclass
class TiltRun:
    """One evaluation: the calls, the objects given to k8s_yaml, the paths the Tiltfile named."""

    calls: list[Call] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    chart_objects: list[dict[str, Any]] = field(default_factory=list)

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


def _split_tests(text: str) -> str:
    """Tilt's filter: documents whose ``# Source:`` is under a chart's tests/ are dropped."""
    docs = text.split("---\n")
    return "---\n".join(d for d in docs if "/tests/" not in _source(d))


def _source(doc: str) -> str:
    for line in doc.splitlines():
        if line.startswith("# Source: "):
            return line
    return ""


class Tilt:
    def __init__(self, env: Mapping[str, str], docker_answers: bool) -> None:
        self.env = dict(env)
        self.docker_answers = docker_answers
        self.run = TiltRun()
        self.globals = sl.Globals.extended_by(
            [sl.LibraryExtension.StructType, sl.LibraryExtension.Print]
        )

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, tiltfile: Path, source: str | None = None) -> TiltRun:
        cwd = tiltfile.parent
        module = sl.Module()
        for name in dir(self):
            if name.startswith("b_"):
                module.add_callable(name[2:], self._builtin(name[2:], getattr(self, name), cwd))
        sl.eval(module, sl.parse("<prelude>", PRELUDE, sl.Dialect.extended()), self.globals)
        text = tiltfile.read_text() if source is None else source
        sl.eval(module, sl.parse(str(tiltfile), text, sl.Dialect.extended()), self.globals)
        return self.run

    def _builtin(self, name: str, fn: Any, cwd: Path) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name != "_os_getenv":
                self.run.calls.append(Call(name, args, kwargs, cwd))
            return fn(cwd, *args, **kwargs)

        return call

    def path(self, cwd: Path, p: str) -> Path:
        resolved = (cwd / p).resolve()
        self.run.paths.append(resolved)
        return resolved

    # -- builtins (b_<name>) ------------------------------------------------------------------

    def b__os_getenv(self, cwd: Path, key: str, default: Any = None) -> Any:
        return self.env.get(key, default)

    def b_include(self, cwd: Path, p: str) -> None:
        Tilt.evaluate(self, self.path(cwd, p))

    def b_allow_k8s_contexts(self, cwd: Path, contexts: Any) -> None:
        pass

    def b_local(self, cwd: Path, command: Any, **kwargs: Any) -> str:
        if isinstance(command, str) and command.startswith("docker info"):
            return "docker\n" if self.docker_answers else "daemonless\n"
        raise AssertionError(f"the Tiltfile runs {command!r} while it loads")

    def b_sync(self, cwd: Path, local_path: str, remote_path: str) -> dict[str, Any]:
        return {"step": "sync", "local": str(self.path(cwd, local_path)), "remote": remote_path}

    def b_run(self, cwd: Path, cmd: Any, trigger: Any = None, **kw: Any) -> dict[str, Any]:
        return {"step": "run", "cmd": cmd, "trigger": trigger}

    def b_custom_build(self, cwd: Path, ref: str, command: Any, deps: list[str], **kw: Any) -> None:
        for dep in deps:
            self.path(cwd, dep)

    def b_docker_build(self, cwd: Path, ref: str, context: str, **kw: Any) -> None:
        self.path(cwd, context)
        self.path(cwd, kw.get("dockerfile", f"{context}/Dockerfile"))

    def b_helm(
        self,
        cwd: Path,
        chart: str,
        name: str = "chart",
        namespace: str = "",
        values: Any = (),
        set: Any = (),
        **kw: Any,
    ) -> str:
        values = [values] if isinstance(values, str) else list(values)
        sets = [set] if isinstance(set, str) else list(set)
        argv = [helm_binary(), "template", name, str(self.path(cwd, chart))]
        if namespace:
            argv += ["--namespace", namespace]
        argv.append("--include-crds")
        for v in values:
            argv += ["--values", str(self.path(cwd, v))]
        for s in sets:
            argv += ["--set", s]
        out = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
        assert out.returncode == 0, f"{' '.join(argv)}:\n{out.stderr}"
        text = _split_tests(out.stdout)
        objects = [d for d in yaml.safe_load_all(text) if d]
        if namespace:
            for o in objects:
                o["metadata"].setdefault("namespace", namespace)
        self.run.chart_objects = objects
        return yaml.safe_dump_all(objects, sort_keys=False)

    def b_k8s_yaml(self, cwd: Path, blob: Any, **kw: Any) -> None:
        assert isinstance(blob, str), "k8s_yaml got no YAML text"
        self.run.objects += [d for d in yaml.safe_load_all(blob) if d]

    def b_encode_yaml(self, cwd: Path, obj: Any) -> str:
        return yaml.safe_dump(obj, sort_keys=False)

    def b_encode_yaml_stream(self, cwd: Path, objs: Any) -> str:
        return yaml.safe_dump_all(objs, sort_keys=False)

    def b_decode_yaml_stream(self, cwd: Path, text: Any) -> list[Any]:
        return [d for d in yaml.safe_load_all(str(text)) if d is not None]

    def b_read_yaml_stream(self, cwd: Path, p: str) -> list[Any]:
        return [d for d in yaml.safe_load_all(self.path(cwd, p).read_text()) if d is not None]

    def b_read_file(self, cwd: Path, p: str) -> str:
        return self.path(cwd, p).read_text()

    def b_k8s_resource(self, cwd: Path, *args: Any, **kwargs: Any) -> None:
        pass

    def b_port_forward(
        self, cwd: Path, local_port: int, container_port: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        return {"local": local_port, "container": container_port or local_port, **kw}


def evaluate(
    tiltfile: Path,
    *,
    docker: bool = False,
    env: Mapping[str, str] | None = None,
    source: str | None = None,
) -> TiltRun:
    """Evaluate ``tiltfile`` (or ``source`` as if it were that file) with stubbed builtins."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DKV_TILT_")}
    return Tilt({**base, **(env or {})}, docker).evaluate(tiltfile, source)
