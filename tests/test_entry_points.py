"""``python -m hostagent`` is the ``hostagent`` command; docs/daemon.md §4 lists every kind
of ``Update`` the subscriber library yields."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VM = ROOT / "fixtures" / "sysfs" / "vm-1s-nosmt" / "sys"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def test_python_m_hostagent_is_the_command():
    helped = run("-m", "hostagent", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: hostagent ")
    probed = run("-m", "hostagent", "probe", "--sysfs-root", str(VM), "--json")
    assert probed.returncode == 0, probed.stderr
    assert probed.stdout == run("-m", "hostagent.cli", "probe", "--sysfs-root", str(VM),
                                "--json").stdout


def test_python_m_hostagent_exit_code_and_error_line(tmp_path):
    r = run("-m", "hostagent", "probe", "--sysfs-root", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.startswith("hostagent: "), r.stderr
    assert len(r.stderr.splitlines()) == 1


def update_kinds_in_the_code() -> set[str]:
    """Every ``Update("<kind>", ...)`` the subscriber library builds."""
    tree = ast.parse((ROOT / "hostagent" / "subscriber.py").read_text())
    return {
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Update"
        and node.args and isinstance(node.args[0], ast.Constant)
    }


def test_docs_list_every_update_kind():
    kinds = update_kinds_in_the_code()
    assert kinds >= {"snapshot", "stale", "dead"}
    text = (ROOT / "docs" / "daemon.md").read_text()
    section = text[text.index("## 4. Subscriber library"):text.index("## 5. Commands")]
    table = section[section.index("| `Update.kind` |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"^\s*\| `([a-z_]+)` \|", table, flags=re.M))
    assert documented == kinds, (documented, kinds)
    for kind in kinds:  # and the example handles each
        assert f'update.kind == "{kind}"' in section, kind
