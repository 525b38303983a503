"""``homeport policy`` without a running server: check offline, set/get/explain on the data dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homeport.server.datadir import (
    POLICY_FILE,
    PolicyFileError,
    load_policy,
    prepare_data_dir,
)
from tests.test_server_cli import run

EXAMPLE = Path(__file__).with_name("data") / "policy-example.hujson"


def test_check_the_worked_example(tmp_path: Path) -> None:
    code, out, _err = run("policy", "check", str(EXAMPLE))
    assert code == 0 and "ok (2 acls, 2 ssh rules" in out
    code, out, _err = run("policy", "check", str(EXAMPLE), "--json")
    assert json.loads(out)["acls"] == 2


def test_check_reports_every_problem_with_file_line_column_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "p.hujson"
    bad.write_text(
        '{\n  "acls": [{"action": "accept", "src": ["group:x"], "dst": ["a:22"]}],\n'
        '  "grants": [],\n}'
    )
    code, out, err = run("policy", "check", str(bad))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"{bad}:2:41: acls[0].src[0]: 'group:x' is not defined in groups",
        f"{bad}:3:3: grants: 'grants' is a Tailscale field homeport does not support",
    ]
    code, out, _err = run("policy", "check", str(bad), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["problems"][0] == {
        "line": 2,
        "column": 41,
        "path": "acls[0].src[0]",
        "error": "'group:x' is not defined in groups",
    }


def test_set_get_explain_offline(tmp_path: Path) -> None:
    data = tmp_path / "server"
    prepare_data_dir(data)
    code, out, err = run("policy", "get", "--data", str(data))
    assert code == 0 and "no policy" in err
    code, out, err = run("policy", "set", str(EXAMPLE), "--data", str(data))
    assert code == 0 and "applies when the server starts" in out, (out, err)
    assert (data / POLICY_FILE).read_text() == EXAMPLE.read_text()
    assert ((data / POLICY_FILE).stat().st_mode & 0o777) == 0o600
    code, out, err = run(
        "policy",
        "explain",
        "dedede@daioh.com",
        "tag:pupupuserver:22",
        "--user",
        "root",
        "--data",
        str(data),
    )
    assert code == 0, err
    assert out.splitlines() == [
        "allow  (rule acls[1])  allowed by acls[1]: group:dev may reach tag:pupupuserver:22",
        "ssh as root: deny  (rule default-deny)  denied by policy: no ssh rule lets group:dev "
        "log in to tag:pupupuserver as root",
    ]
    # a refused set leaves the stored policy alone
    bad = tmp_path / "bad.hujson"
    bad.write_text(
        '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],'
        ' "tests": [{"src": "a@b", "deny": ["tag:x:1"]}]}'
    )
    code, _out, err = run("policy", "set", str(bad), "--data", str(data))
    assert code == 1 and "tests[0].deny[0]: 'tag:x:1': 'tag:x' is not defined in tagOwners" in err
    assert (data / POLICY_FILE).read_text() == EXAMPLE.read_text()
    # and back to no policy
    code, out, err = run("policy", "unset", "--data", str(data))
    assert code == 0 and "policy removed" in out, (out, err)
    assert not (data / POLICY_FILE).exists()
    code, out, err = run("policy", "unset", "--data", str(data))
    assert code == 0 and "no policy was set" in err


def test_a_bad_stored_policy_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / POLICY_FILE).write_text('{"acls": [{}]}')
    with pytest.raises(PolicyFileError) as info:
        load_policy(tmp_path)
    assert f"{tmp_path / POLICY_FILE}:1:11: acls[0]: missing field 'action'" in str(info.value)
    (tmp_path / POLICY_FILE).unlink()
    assert load_policy(tmp_path) is None
