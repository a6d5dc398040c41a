"""The pack loads in a real ComfyUI, documents every node, and its core stands alone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from hypersd_dev import REPO, comfy_dir

COMFY = comfy_dir()


def test_core_imports_without_comfyui():
    """The pack's package and every module of its core import with no ComfyUI on the path, pull none
    in, and reach nothing of the nodes (the one way to import them: hypersd_dev, as scripts do)."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        sys.path = [p for p in sys.path if 'ComfyUI' not in p]
        sys.path.insert(0, {str(REPO)!r})
        import hypersd_dev
        import ComfyUI_HyperSD.hypersd_core as core
        names = [m.name for m in pkgutil.iter_modules(core.__path__)]
        for n in names:
            importlib.import_module(core.__name__ + '.' + n)
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server', 'comfy_extras')
                     or m.startswith('ComfyUI_HyperSD.nodes'))
        print('MODULES', len(names), 'BAD', bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout and "MODULES 0" not in out.stdout, out.stdout


def test_core_and_nodes_stay_apart():
    """hypersd_core imports nothing from nodes/ or ComfyUI, and nothing outside tests/ reaches into tests/."""
    import ast

    for path in sorted((REPO / "hypersd_core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                root = name.lstrip(".").split(".")[0]
                assert not (node.__class__ is ast.ImportFrom and node.level > 1), f"{path.name} reaches out: {name}"
                assert root not in ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server",
                                    "toy", "hypersd_dev"), f"{path.name} imports {name}"
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv", ".host"):
            continue
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert not ("sys.path" in code and "tests" in code), f"{rel} puts tests/ on sys.path: {line.strip()}"
            assert not code.lstrip().startswith(("import conftest", "from conftest")), f"{rel} imports conftest"


def test_pack_loads_and_documents_every_node(server, pack):
    ids = [n.GET_SCHEMA().node_id for n in pack.nodes.all_nodes()]
    assert ids, "the pack registers no node"
    assert len(ids) == len(set(ids)), f"duplicate node ids: {ids}"
    info = server.get("/object_info")
    for node_id in ids:
        assert node_id in info, f"{node_id} missing from /object_info"
        d = info[node_id]
        assert d["category"].startswith("Hyper-SD"), (node_id, d["category"])
        assert len(d.get("description", "")) > 20, f"{node_id} has no description"
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(t for t in d.get("output_tooltips", [])), f"{node_id} lacks output tooltips"
    log = server.log()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "HyperSD" in l)


def test_pack_import_reaches_no_network_and_installs_nothing():
    """Importing the pack (as ComfyUI does) opens no socket and starts no process."""
    code = textwrap.dedent(f"""
        import socket, subprocess, sys
        sys.path.insert(0, {str(COMFY)!r})
        import comfy.cli_args; comfy.cli_args.args.cpu = True
        import utils.extra_config, nodes
        def refuse(*a, **k): raise AssertionError('network or process at import: ' + repr(a)[:200])
        socket.socket.connect = refuse
        socket.create_connection = refuse
        subprocess.Popen.__init__ = refuse
        import importlib.util
        spec = importlib.util.spec_from_file_location('ComfyUI_HyperSD', {str(REPO / '__init__.py')!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)
        import asyncio
        ext = asyncio.run(m.comfy_entrypoint())
        print('NODES', len(asyncio.run(ext.get_node_list())))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(COMFY), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NODES " in out.stdout


def _setup(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "COMFYUI_PYTHON")}
    env.update(env_extra)
    return subprocess.run(["python3", str(REPO / "scripts" / "setup_host.py")], capture_output=True, text=True, env=env)


def test_setup_rejects_missing_broken_and_old_hosts(tmp_path):
    missing = _setup({"COMFYUI_DIR": str(tmp_path / "nope")})
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "main.py").write_text("")
    out = _setup({"COMFYUI_DIR": str(broken)})
    assert out.returncode == 1 and "not a ComfyUI folder" in out.stderr and "comfy" in out.stderr
    assert "Traceback" not in out.stderr

    old = tmp_path / "old"
    for p in ("comfy", "custom_nodes"):
        (old / p).mkdir(parents=True)
    for f in ("main.py", "nodes.py", "folder_paths.py"):
        (old / f).write_text("")
    (old / "comfyui_version.py").write_text('__version__ = "0.3.10"\n')
    out = _setup({"COMFYUI_DIR": str(old), "COMFYUI_PYTHON": sys.executable})
    assert out.returncode == 1 and "too old" in out.stderr and "0.3.10" in out.stderr
    assert not (old / "custom_nodes" / "ComfyUI-HyperSD").exists()


def test_setup_links_into_a_user_comfyui(tmp_path):
    """COMFYUI_DIR mode: links the repository into that install's custom_nodes, twice safely."""
    user = tmp_path / "ComfyUI"
    for p in ("comfy", "custom_nodes"):
        (user / p).mkdir(parents=True)
    for f in ("main.py", "nodes.py", "folder_paths.py"):
        (user / f).write_text("")
    (user / "comfyui_version.py").write_text('__version__ = "0.3.75"\n')
    for _ in range(2):
        out = _setup({"COMFYUI_DIR": str(user), "COMFYUI_PYTHON": sys.executable})
        assert out.returncode == 0, out.stderr
    link = user / "custom_nodes" / "ComfyUI-HyperSD"
    assert link.is_symlink() and link.resolve() == REPO
    assert f"HYPERSD_COMFYUI={user.resolve()}" in out.stdout


def test_registry_metadata_reads_in_the_hosts_own_parser(comfy):
    """``pyproject.toml`` as ComfyUI's own ``comfy_config`` parser (what the registry reads)
    takes it: a name without "ComfyUI", semver, the supported ComfyUI and front-end ranges,
    the OS and accelerator classifiers, the display name."""
    import re

    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(REPO))
    p = cfg.project
    assert "comfyui" not in p.name.lower() and re.fullmatch(r"\d+\.\d+\.\d+", p.version)
    assert (p.supported_comfyui_version, p.supported_comfyui_frontend_version) == (">=0.3.48", ">=1.32.9")
    assert p.supported_os == ["OS Independent"] and p.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert cfg.tool_comfy.display_name == "Hyper-SD" and cfg.tool_comfy.publisher_id


def test_servers_run_on_the_cpu_only_where_torch_sees_no_gpu(monkeypatch, comfy):
    """``scripts/run.sh`` and the test servers pass ComfyUI ``--cpu`` only where torch has no
    accelerator (or ``HYPERSD_DEVICE=cpu`` asks for it); a bad value names the variable."""
    import pytest
    import torch

    from hypersd_dev import device

    monkeypatch.delenv("HYPERSD_DEVICE", raising=False)
    assert device.has_accelerator() == (torch.cuda.is_available() or torch.backends.mps.is_available()
                                        or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    assert device.server_args() == ([] if device.has_accelerator() else ["--cpu"])
    monkeypatch.setenv("HYPERSD_DEVICE", "cpu")
    assert device.server_args() == ["--cpu"]
    monkeypatch.setenv("HYPERSD_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="HYPERSD_DEVICE"):
        device.server_args()
